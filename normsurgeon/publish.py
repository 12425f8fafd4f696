"""Writing outputs: checked before any work, written to a temporary file, published without clobbering.

- :func:`check_output` refuses, before any work, an output that exists (without ``force``), is a
  folder, or has the wrong suffix for what the verb writes.
- :func:`publish` writes through a temporary file beside the output (named after the output and the
  writing process) and moves it into place. Without ``force`` the move is a hard link, which fails
  if anything appeared at the output path meanwhile (a file, a folder, a dangling symlink): another
  run's output is never silently replaced. With ``force`` the old file's permission bits are kept.
- Temporary files left by a killed process (SIGKILL) are removed by the next run for that output.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterator

from normsurgeon.errors import EnvironmentProblem, OutputExistsError

OUTPUT_KINDS = ("model", "onnx", "any")
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(dir)?")


def check_output(path: str | os.PathLike, force: bool = False, kind: str = "model") -> Path:
    """Fail early (before any work) if ``path`` exists without ``force``, is a folder, or its extension
    does not fit ``kind``: "model" (a PyTorch model, anything but .onnx), "onnx", or "any" (reports). A
    missing folder is not an error: :func:`publish` creates it."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, not {kind!r}")
    out = Path(path)
    is_onnx = out.suffix.lower() == ".onnx"
    if kind == "model" and is_onnx:
        raise OutputExistsError(f"cannot write {out.name}: this command writes a PyTorch model, so name the "
                                "output .pt or .safetensors; use `normsurgeon export` for ONNX")
    if kind == "onnx" and not is_onnx:
        raise OutputExistsError(f"cannot write {out.name}: export writes ONNX, so name the output .onnx "
                                "(convert, fold, equalize and recalibrate write PyTorch models)")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name")
    if os.path.lexists(out) and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"cannot write {out}: {parent} is a file, not a folder")
            break
    return out


def missing_folder(path: str | os.PathLike) -> Path | None:
    """The output's folder when it does not exist yet (publishing will create it), else None."""
    parent = Path(path).parent
    return None if parent.exists() else parent


def publish(out: Path, write: Callable[[str], None], force: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``out`` (see the module docstring)."""
    out = Path(out)
    with temp_path(out) as tmp:
        _guard(lambda: write(str(tmp)), out)
        move_into_place(tmp, out, force)
    return out


@contextlib.contextmanager
def temp_path(out: Path, folder: bool = False) -> Iterator[Path]:
    """A fresh temporary file name (or folder, created) beside ``out``; removed on exit if still there."""
    out = Path(out)
    _make_folder(out.parent)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{'dir' if folder else ''}"
    if folder:
        _guard(lambda: tmp.mkdir(mode=0o700), out)
    try:
        yield tmp
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            tmp.unlink()


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Publish the finished file ``tmp`` as ``out``: never over something that appeared at ``out``
    unless ``force``; with ``force`` an old file's permission bits are kept."""
    mode = 0o666 & ~_umask()
    old = _lstat(out)
    if old is not None and not force:
        raise OutputExistsError(f"{out} appeared while this command ran; nothing was replaced "
                                "(pass --force to overwrite it)")
    if old is not None and stat.S_ISREG(old.st_mode):
        mode = stat.S_IMODE(old.st_mode)
    _guard(lambda: os.chmod(tmp, mode), out)
    if force:
        _guard(lambda: os.replace(tmp, out), out)
        return
    try:
        os.link(tmp, out)  # atomic, and fails if anything is at `out`, a dangling symlink included
    except FileExistsError:
        raise OutputExistsError(f"{out} appeared while this command ran; nothing was replaced "
                                "(pass --force to overwrite it)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise environment_error(e, out) or e from None
        # a file system without hard links: check and rename (a narrow window remains)
        if os.path.lexists(out):
            raise OutputExistsError(f"{out} appeared while this command ran; nothing was replaced "
                                    "(pass --force to overwrite it)") from None
        _guard(lambda: os.replace(tmp, out), out)
        return
    tmp.unlink()


def remove_stale(out: Path) -> list[Path]:
    """Remove temporary files and folders for ``out`` left by processes that no longer run."""
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if not m or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _make_folder(folder: Path) -> None:
    if not folder.exists():
        _guard(lambda: folder.mkdir(parents=True, exist_ok=True), folder)


ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def environment_error(e: OSError, where: Path | str) -> EnvironmentProblem | None:
    """The machine's refusal of a write (permissions, a full disk, a read-only file system) as one
    clear environment error (exit 4), or None for other OS errors."""
    if e.errno in ENVIRONMENT_ERRNOS:
        return EnvironmentProblem(f"cannot write {where}: {e.strerror}")
    return None


def _guard(action: Callable[[], object], where: Path):
    """Run a file-system action, turning the machine's refusals into :func:`environment_error`."""
    try:
        return action()
    except OSError as e:
        problem = environment_error(e, where)
        if problem is not None:
            raise problem from None
        raise


def _lstat(path: Path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask
