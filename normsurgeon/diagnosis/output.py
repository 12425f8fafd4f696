"""Report files (PNG, HTML): the path checks done before any work, and atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

from normsurgeon.errors import DependencyError, OutputExistsError
from normsurgeon.model_io import _atomic

PLOT_EXTRA = "pip install 'normsurgeon[plot]'"


def need_matplotlib() -> None:
    """One error line naming the extra when matplotlib is missing (checked before the pass)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DependencyError(f"--plot/--html need matplotlib, which is not installed: {PLOT_EXTRA}") from None


def check_report_path(path: str | os.PathLike, suffix: str, flag: str, force: bool = False) -> Path:
    """Refuse a wrong extension, a missing folder, a directory, or an existing file without ``force``."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise OutputExistsError(f"{flag} writes {suffix[1:].upper()}: name the file *{suffix}, not {out.name}")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise OutputExistsError(f"folder {out.parent} does not exist; create it first")
    return out


def write_bytes(out: Path, data: bytes) -> Path:
    """Write ``data`` to ``out`` atomically (a temporary file in the same folder, then a rename)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(Path(out), write)
    return Path(out)
