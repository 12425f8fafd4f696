"""``diagnose``: per-norm-layer measures on data (staleness, collapse, instance variability, dead
channels, similarity to a teacher) with a verdict per layer; tables, JSON, PNG and HTML reports.

``diagnose`` and ``DiagnoseResult`` are imported on first use, so the torch-free parts (report paths,
the matplotlib check) load without torch."""
from __future__ import annotations

__all__ = ["DiagnoseResult", "diagnose"]


def __getattr__(name: str):
    if name in __all__:
        from normsurgeon.diagnosis import run

        return getattr(run, name)
    raise AttributeError(f"module 'normsurgeon.diagnosis' has no attribute {name!r}")
