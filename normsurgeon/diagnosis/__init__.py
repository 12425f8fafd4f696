"""``diagnose``: per-norm-layer measures on data (staleness, collapse, instance variability, dead
channels, similarity to a teacher) with a verdict per layer; tables, JSON, PNG and HTML reports."""
from normsurgeon.diagnosis.run import DiagnoseResult, diagnose

__all__ = ["DiagnoseResult", "diagnose"]
