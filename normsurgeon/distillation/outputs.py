"""What the student is matched on: the model's output tensors, a loss between two outputs, and
top-1 agreement.

Outputs may be a tensor, a tuple/list of tensors, a dict of tensors (keys in sorted order) or an
object with ``.logits``; every tensor is matched. A 2-D ``(N, K)`` output is a classifier's logits;
anything else (segmentation maps, features, sequences) is matched by mean squared error.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from normsurgeon.errors import DistillError

LOSSES = ("auto", "kl", "mse")


def tensors(out: Any) -> list[torch.Tensor]:
    """The output tensors of a forward, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in tensors(out[k])]
    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return [out.logits]
    return []


def check_compatible(s_out: Any, t_out: Any) -> None:
    """Teacher and student must return the same tensors in the same shapes."""
    s, t = tensors(s_out), tensors(t_out)
    if not t:
        raise DistillError(f"the teacher returns {type(t_out).__name__}, which holds no tensor to match")
    if len(s) != len(t) or any(a.shape != b.shape for a, b in zip(s, t)):
        raise DistillError(f"student and teacher outputs differ in shape: student {[tuple(a.shape) for a in s]}, "
                           f"teacher {[tuple(b.shape) for b in t]}; the student must be the teacher's architecture "
                           "with other normalization layers")


def check_loss(kind: str) -> str:
    if kind not in LOSSES:
        raise DistillError(f"bad loss {kind!r}: use auto (KL on (N, classes) logits, MSE otherwise), kl or mse")
    return kind


def loss(s_out: Any, t_out: Any, kind: str = "auto", temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the distance between student and teacher outputs (summed over tensors)."""
    total = None
    for s, t in zip(tensors(s_out), tensors(t_out)):
        t = t.detach()
        use_kl = kind == "kl" or (kind == "auto" and s.dim() == 2)
        if use_kl:
            tau = float(temperature)
            part = F.kl_div(F.log_softmax(s.float() / tau, dim=1), F.log_softmax(t.float() / tau, dim=1),
                            reduction="batchmean", log_target=True) * tau * tau
        else:
            part = F.mse_loss(s.float(), t.float())
        total = part if total is None else total + part
    return total


def top1(out: Any) -> torch.Tensor:
    """Top-1 class per sample (per position for dense outputs): argmax over dim 1 of the first output."""
    t = tensors(out)[0]
    return t.argmax(1) if t.dim() >= 2 else (t > 0).long()


def mean_abs_diff(s_out: Any, t_out: Any) -> torch.Tensor:
    """Per-sample mean |student - teacher| over all output values, shape (N,)."""
    parts = [(a.float() - b.float()).abs().reshape(a.shape[0], -1) for a, b in zip(tensors(s_out), tensors(t_out))]
    return torch.cat(parts, 1).mean(1)
