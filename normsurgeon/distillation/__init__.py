"""Distillation of a BN teacher into a batch-independent student (see :mod:`normsurgeon.distillation.api`)."""
from normsurgeon.distillation.api import DistillResult, distill

__all__ = ["DistillResult", "distill"]
