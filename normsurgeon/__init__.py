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

Every error a user can cause is a :class:`NormSurgeonError` subclass from :mod:`normsurgeon.errors`
(also exported here); its ``exit_code`` is what the command line exits with.
    diagnose(model, data, teacher=None, ...) -> DiagnoseResult

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
    "diagnose": "normsurgeon.diagnosis",
    "DiagnoseResult": "normsurgeon.diagnosis",
    "NormSurgeonError": "normsurgeon.errors",
    **{name: "normsurgeon.errors" for name in (
        "ModelSpecError", "ProbeError", "ManifestError", "UntrustedCodeError", "UntrustedPickleError", "RecipeError",
        "PatternError", "TraceError", "OutputExistsError", "DataError", "VerificationError", "ExportError",
        "NothingToRecalibrateError", "NoNormLayersError", "NoiseSpecError", "DependencyError", "EnvironmentProblem",
        "DistillError", "InterruptedRun")},
    "Change": "normsurgeon.report",
    "SurgeryResult": "normsurgeon.report",
    "EvaluateResult": "normsurgeon.calibrate.evaluate",
    "CrossIterationBatchNorm": "normsurgeon.layers",
    "BatchKalmanNorm": "normsurgeon.layers",
    "InstanceEnhancedBatchNorm": "normsurgeon.layers",
    "DAIN": "normsurgeon.layers",
}

__all__ = sorted(_API) + ["__version__"]


def __dir__() -> list[str]:  # the public API (lazy attributes included) for dir() and tab completion
    return sorted(set(__all__) | {"provenance"})


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'normsurgeon' has no attribute {name!r}")
