"""Checking a rewrite numerically: output error on a probe input, and batch independence."""
from __future__ import annotations

import copy

import torch
from torch import nn

from normsurgeon.report import Verification


def flatten_outputs(out) -> list[torch.Tensor]:
    """All floating tensors in a model output (tensor, tuple/list, dict, namedtuple), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def output_error(ref_outputs, new_outputs) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) over all output tensors."""
    refs, news = flatten_outputs(ref_outputs), flatten_outputs(new_outputs)
    if len(refs) != len(news):
        return float("inf"), float("inf")
    max_abs, max_rel = 0.0, 0.0
    for r, n in zip(refs, news):
        if r.shape != n.shape:
            return float("inf"), float("inf")
        r64, n64 = r.detach().double(), n.detach().double()
        err = (r64 - n64).abs().max().item() if r64.numel() else 0.0
        scale = r64.abs().max().item() if r64.numel() else 0.0
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    return max_abs, max_rel


@torch.no_grad()
def compare(original: nn.Module, rewritten: nn.Module, x: torch.Tensor, tolerance: float | None) -> Verification:
    """Eval-mode outputs of both models on ``x``; the models' train/eval state is restored."""
    states = (original.training, rewritten.training)
    original.eval(), rewritten.eval()
    try:
        abs_err, rel_err = output_error(original(x), rewritten(x))
    finally:
        original.train(states[0]), rewritten.train(states[1])
    return Verification(max_abs_error=abs_err, max_rel_error=rel_err, tolerance=tolerance)


def batch_independence_error(model: nn.Module, x: torch.Tensor, train: bool = False) -> float:
    """Max relative change of sample 0's output when the rest of the batch is replaced.

    In train mode the model is deep-copied first (running statistics must not move) and dropout is
    switched off, so only normalization can make samples interact.
    """
    m = copy.deepcopy(model) if train else model
    was = m.training
    m.train(train)
    if train:
        for mod in m.modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd) or type(mod).__name__ in ("DropPath",):
                mod.eval()
    try:
        with torch.no_grad():
            a = m(x)
            other = x.clone()
            g = torch.Generator().manual_seed(1234)  # deterministic: the same verdict on every run
            noise = torch.randn(other[1:].shape, generator=g, dtype=torch.float32)
            other[1:] = (noise * 3.0 + 1.0).to(dtype=other.dtype, device=other.device)
            b = m(other)
    finally:
        m.train(was)
    ra = [t[:1] for t in flatten_outputs(a)]
    rb = [t[:1] for t in flatten_outputs(b)]
    return output_error(ra, rb)[1]
