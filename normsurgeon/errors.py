"""Errors a user can cause, and the exit codes of the command line.

Each error carries one line that says what went wrong and what to do. The CLI prints
``error: <message>`` for these, without a traceback, and exits with the class's ``exit_code``:

====  ==================================================================================
0     ok
2     the user's input: a bad flag, file, data, model spec or manifest
3     verification failed (a rewrite or an export changed the function beyond its limit)
4     the environment: a read-only folder, a full disk, out of memory
1     a bug in normsurgeon: printed as "internal error: ... please report it"
====  ==================================================================================

Anything else escaping a verb is a bug in normsurgeon.
"""
from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (cut to ``limit`` characters), or its type name: what
    a one-line error quotes of a library's or the user's own exception."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def did_you_mean(word: str, choices, n: int = 3) -> str:
    """ " (did you mean X?)" for the closest of ``choices`` (empty when nothing is close)."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


class NormSurgeonError(Exception):
    """Base class: a problem with the user's input, not with normsurgeon."""

    exit_code = 2


class ModelSpecError(NormSurgeonError):
    """The MODEL argument names nothing loadable (bad path, unknown zoo name, bad factory)."""


class ProbeError(ModelSpecError):
    """The model raised when run on the probe input (wrong shape, several inputs, ...)."""


class ManifestError(ModelSpecError):
    """A model file's manifest is malformed or records something normsurgeon will not replay."""


class UntrustedCodeError(ModelSpecError):
    """A model file names code to import (a ``module:callable`` source); the user did not opt in."""


class UntrustedPickleError(NormSurgeonError):
    """The file is a full pickle and would run code on load; the user did not opt in."""


class RecipeError(NormSurgeonError):
    """Unknown recipe or bad recipe argument."""


class PatternError(NormSurgeonError):
    """A layer-name pattern (--keep, --layer) that matches no layer: most likely a typo."""


class TraceError(NormSurgeonError):
    """The model cannot be traced and no fallback path applies."""


class OutputExistsError(NormSurgeonError):
    """The output path exists and --force was not given."""


class DataError(NormSurgeonError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class VerificationError(NormSurgeonError):
    """A rewrite changed the function more than the tolerance allows (only raised under --verify)."""

    exit_code = 3


class ExportError(NormSurgeonError):
    """torch.onnx could not export the model."""


class NothingToRecalibrateError(NormSurgeonError):
    """The model has no layer with running statistics."""


class NoNormLayersError(NormSurgeonError):
    """The model has no normalization layer to diagnose."""


class NoiseSpecError(NormSurgeonError):
    """A bad --noise / --noise-mode / --noise-seed / --noise-samples value."""


class DependencyError(NormSurgeonError):
    """An optional dependency (onnxruntime, CUDA, timm, ...) is missing."""


class DistillError(NormSurgeonError):
    """Distillation cannot start or continue: teacher and student disagree in output shape, the loss
    became NaN/Inf, or a checkpoint does not fit the run."""


class InterruptedRun(NormSurgeonError):
    """The user stopped a long run (Ctrl-C); a checkpoint was written so it can be resumed."""

    exit_code = 130


class EnvironmentProblem(NormSurgeonError):
    """The machine, not the input: a read-only folder, a full disk, not enough memory."""

    exit_code = 4


EXIT_CODES = {"ok": 0, "internal": 1, "input": 2, "verification": 3, "environment": 4, "interrupted": 130}
