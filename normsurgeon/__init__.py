"""normsurgeon: surgery on the normalization layers of PyTorch models.

Public API (each CLI verb is a thin layer over one of these)::

    load_model(spec, weights=None, trust_pickle=False) -> nn.Module
    save_model(model, path, force=False)
    inspect(model) -> InspectReport
    convert(model, to="gn+ws", ...) -> SurgeryResult
    fold(model, ...) -> SurgeryResult
    equalize(model, ...) -> SurgeryResult
    recalibrate(model, data, ...) -> SurgeryResult
    evaluate(model, data, ..., teacher=None) -> dict
    distill(student, teacher, data, ...) -> DistillResult
    export_onnx(model, path, ...) -> ExportReport
    bench(model, ...) -> BenchReport

Attributes are imported lazily so ``import normsurgeon`` (and ``normsurgeon --help``) stay fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "normsurgeon.model_io",
    "save_model": "normsurgeon.model_io",
    "inspect": "normsurgeon.passes.inspect",
    "convert": "normsurgeon.passes.convert",
    "fold": "normsurgeon.passes.fold",
    "equalize": "normsurgeon.passes.equalize",
    "recalibrate": "normsurgeon.calibrate.recalibrate",
    "evaluate": "normsurgeon.calibrate.evaluate",
    "distill": "normsurgeon.distillation.api",
    "DistillResult": "normsurgeon.distillation.api",
    "export_onnx": "normsurgeon.deploy.export",
    "bench": "normsurgeon.deploy.bench",
    "NormSurgeonError": "normsurgeon.errors",
    "Change": "normsurgeon.report",
    "SurgeryResult": "normsurgeon.report",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'normsurgeon' has no attribute {name!r}")
