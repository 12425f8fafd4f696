"""Compile a C file shipped with normsurgeon on first use, cache the shared library, load it.

No build step at install time and no hard dependency on a compiler: when no C compiler is found,
compiling fails, or ``NORMSURGEON_NATIVE=0`` is set, :func:`load` returns None and callers use their
pure-PyTorch path; :func:`reason` says why, in one line.

- Compiler: ``$CC`` (may hold words: ``ccache gcc``), else ``cc``, ``gcc`` or ``clang`` on PATH. Flags: ``-O3 -march=native -fopenmp``;
  without OpenMP (Apple clang) the library is built single-threaded, without ``-march=native`` for
  compilers that refuse it.
- Cache: ``$NORMSURGEON_CACHE``, else ``$XDG_CACHE_HOME/normsurgeon``, else ``~/.cache/normsurgeon``.
  The file name hashes the source, the compiler, the flags and this CPU's model and feature flags, so
  a home directory shared by different machines never loads a library built for another CPU. A
  library is written under a temporary name and renamed into place, so processes started together
  (torchrun) never see half a file. A cached library that is not the user's own, or that others may
  write, is never loaded: it would run as native code.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFF_VALUES = {"0", "off", "false", "no"}
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
BUILD_TIMEOUT_S = 120

_reasons: dict[str, str] = {}


def cache_dir() -> Path:
    env = os.environ.get("NORMSURGEON_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "normsurgeon"


def compiler() -> list[str] | None:
    """The compiler command: ``$CC`` (words, e.g. ``ccache gcc``), else the first of cc, gcc, clang."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            words = shlex.split(cc)
        except ValueError:  # unbalanced quotes
            return None
        if not words:
            return None
        found = shutil.which(words[0]) or (words[0] if os.path.isfile(words[0]) and os.access(words[0], os.X_OK)
                                           else None)
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def cpu_signature() -> str:
    """This CPU's model and feature flags (Linux), else what the platform module knows."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def reason(name: str) -> str:
    """Why :func:`load` returned None for ``name`` (empty when it did not)."""
    return _reasons.get(name, "")


@functools.lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``normsurgeon/native/<name>.c``, building it if needed; None if unavailable."""
    if os.environ.get("NORMSURGEON_NATIVE", "1").strip().lower() in OFF_VALUES:
        _reasons[name] = "disabled by NORMSURGEON_NATIVE=0"
        return None
    if sys.platform == "win32":
        _reasons[name] = "native kernels are built on Linux and macOS only"
        return None
    cc = compiler()
    if cc is None:
        given = os.environ.get("CC", "").strip()
        _reasons[name] = (f"CC={given!r} is not an executable compiler" if given
                          else "no C compiler found (set CC, or install gcc or clang)")
        return None
    source = (HERE / f"{name}.c").read_bytes()
    errors = []
    for flags in FLAG_SETS:
        path = _cached_path(name, source, cc, flags)
        if not path.exists():
            err = _compile(cc, flags, HERE / f"{name}.c", path)
            if err:
                errors.append(f"{' '.join(flags)}: {err}")
                if err.startswith("timed out"):  # a hanging compiler: do not wait once per flag set
                    break
                continue
        unsafe = _unsafe(path)
        if unsafe:
            _reasons[name] = unsafe
            return None
        try:
            return ctypes.CDLL(str(path))
        except OSError as e:
            errors.append(f"{' '.join(flags)}: cannot load {path}: {e}")
    _reasons[name] = f"could not build {name}.c with {' '.join(cc)} ({errors[0] if errors else 'no flag set worked'})"
    return None


def _unsafe(path: Path) -> str:
    """Why a cached library must not be loaded (it runs as native code in this process): not
    owned by this user, or writable by others; '' when it may."""
    if not hasattr(os, "getuid"):
        return ""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        return (f"{path} is not owned by you or is writable by others: not loading it (remove it, or set "
                "NORMSURGEON_CACHE to a folder of your own)")
    return ""


def _cached_path(name: str, source: bytes, cc: list[str], flags: tuple[str, ...]) -> Path:
    h = hashlib.sha256()
    for part in (source, " ".join(cc).encode(), " ".join(flags).encode(), cpu_signature().encode(),
                 platform.machine().encode(), sys.platform.encode()):
        h.update(part)
        h.update(b"\0")
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return cache_dir() / f"{name}-{h.hexdigest()[:16]}{suffix}"


def _compile(cc: list[str], flags: tuple[str, ...], src: Path, dest: Path) -> str:
    """Build ``src`` into ``dest`` atomically; an error text (one line) or ''."""
    try:
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as e:
        return f"cache folder {dest.parent} is not writable ({e.strerror}); set NORMSURGEON_CACHE"
    cmd = [*cc, *flags, "-std=gnu11", "-fPIC", "-shared", str(src), "-o", tmp, "-lm"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if run.returncode != 0:
            lines = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip()]
            return lines[0][:200] if lines else f"exit {run.returncode}"
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        return ""
    except subprocess.TimeoutExpired:
        return f"timed out after {BUILD_TIMEOUT_S} s"
    except (OSError, subprocess.SubprocessError) as e:
        return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
