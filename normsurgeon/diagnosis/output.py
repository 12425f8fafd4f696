"""Report files (PNG, HTML): the path checks done before any work, and atomic writes."""
from __future__ import annotations

import os
from pathlib import Path

from normsurgeon.errors import DependencyError, OutputExistsError
from normsurgeon.publish import check_output, publish

PLOT_EXTRA = "pip install 'normsurgeon[plot]'"


def need_matplotlib() -> None:
    """One error line naming the extra when matplotlib is missing (checked before the pass)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DependencyError(f"--plot/--html need matplotlib, which is not installed: {PLOT_EXTRA}") from None


def check_report_path(path: str | os.PathLike, suffix: str, flag: str, force: bool = False) -> Path:
    """Refuse a wrong extension, a directory, or an existing file without ``force`` (before any work)."""
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise OutputExistsError(f"{flag} writes {suffix[1:].upper()}: name the file *{suffix}, not {out.name}")
    return check_output(out, force, kind="any")


def write_bytes(out: Path, data: bytes, force: bool = True) -> Path:
    """Write ``data`` to ``out`` atomically (:func:`normsurgeon.publish.publish`); without ``force`` a
    file already at ``out`` is left alone."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return publish(Path(out), write, force)
