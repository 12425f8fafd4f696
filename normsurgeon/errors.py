"""Errors a user can cause. Each carries one line that says what went wrong and what to do.

The CLI prints ``error: <message>`` for these, without a traceback, and exits with ``exit_code``.
Anything else escaping a verb is a bug in normsurgeon.
"""
from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (cut to ``limit`` characters), or its type name: what
    a one-line error quotes of a library's or the user's own exception."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


class NormSurgeonError(Exception):
    """Base class: a problem with the user's input, not with normsurgeon."""

    exit_code = 2


class ModelSpecError(NormSurgeonError):
    """The MODEL argument names nothing loadable (bad path, unknown zoo name, bad factory)."""


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


class DependencyError(NormSurgeonError):
    """An optional dependency (onnxruntime, CUDA, timm, ...) is missing."""


class DistillError(NormSurgeonError):
    """Distillation cannot start or continue: teacher and student disagree in output shape, the loss
    became NaN/Inf, or a checkpoint does not fit the run."""


class InterruptedRun(NormSurgeonError):
    """The user stopped a long run (Ctrl-C); a checkpoint was written so it can be resumed."""

    exit_code = 130
