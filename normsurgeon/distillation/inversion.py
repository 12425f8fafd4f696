"""Data-free inputs (``--data inversion:N``): synthesize N inputs from the teacher alone.

DeepInversion (Yin et al., CVPR 2020) / ZeroQ (Cai et al., CVPR 2020): a trained BN network records
in each BN layer the per-channel mean and variance its input had over the training data. Starting
from Gaussian noise, inputs are optimized (Adam, cosine-decayed step) so that every teacher BN
layer's *batch* statistics of its input match its running statistics:

    L = sum_l w_l ( ||mu_l(x') - running_mean_l||_2 + ||var_l(x') - running_var_l||_2 )
        + ce * CrossEntropy(teacher(x'), targets) + tv * TV(x) + l2 * mean(x^2)

``x'`` is ``x`` rolled by a random shift of up to ``jitter`` positions along every axis after the
channel axis, drawn anew each iteration (DeepInversion's jitter: the inputs must match the
statistics wherever they sit). ``w_1 = first_bn`` weights the first BN layer (the closest to the input,
so the one that constrains the input most), ``w_l = 1`` for the others. ``targets`` are balanced
classes (each class about equally often in every batch, seeded order) when the teacher returns
(N, classes) logits (DeepInversion's cross-entropy term; ``ce=0`` gives ZeroQ's statistics-only
loss). A small ``ce`` measured better than ``ce=1``: the inputs stay closer to the class boundaries
instead of all becoming extreme-confidence examples. ``TV`` is the mean squared difference between
neighbouring values along every axis after the channel axis (a smoothness prior). ``clamp=(lo, hi)``
(off by default: the data range is not known in general) starts from noise inside the range and
keeps the inputs in it after every step. Inputs are made in batches of ``batch_size`` (batch
statistics need a batch); the teacher is in eval mode and unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.distillation import outputs
from normsurgeon.errors import DataError
from normsurgeon.graph.modules import is_batchnorm

PREFIX = "inversion"
DEFAULTS = {"iterations": 300, "batch_size": 128, "lr": 0.1, "ce": 0.1, "tv": 1e-3, "l2": 1e-4,
            "jitter": 2, "first_bn": 10.0, "clamp": None}


def parse(spec) -> int | None:
    """N for an ``inversion:N`` or ``inversion:N:LO,HI`` spec; None for any other DATA."""
    parsed = parse_full(spec)
    return None if parsed is None else parsed[0]


def parse_full(spec) -> tuple[int, tuple[float, float] | None] | None:
    """(N, (LO, HI) or None) for ``inversion:N[:LO,HI]``; None for any other DATA. ``LO,HI`` is the
    input range the synthesized inputs are kept in (e.g. ``0,1`` for images scaled to [0, 1])."""
    if not isinstance(spec, str) or not spec.strip().startswith(PREFIX):
        return None
    bad = (f"bad DATA {spec!r}: write inversion:N with N the number of inputs to synthesize, e.g. inversion:2048, "
           "or inversion:N:LO,HI to keep the inputs in [LO, HI], e.g. inversion:2048:0,1")
    parts = spec.strip().split(":")
    if len(parts) not in (2, 3) or parts[0] != PREFIX or not parts[1].isdigit() or int(parts[1]) < 1:
        raise DataError(bad)
    if len(parts) == 2:
        return int(parts[1]), None
    try:
        lo, hi = (float(v) for v in parts[2].split(","))
    except ValueError:
        raise DataError(bad) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise DataError(bad)
    return int(parts[1]), (lo, hi)


def sample_shape(teacher: nn.Module, input_shape) -> tuple[int, ...]:
    """Per-sample input shape: ``input_shape`` N,C,... as every verb's --input-shape (N is ignored:
    ``inversion:N`` sets the count) or the model's own config (timm's ``input_size``)."""
    if input_shape:
        shape = tuple(int(v) for v in input_shape)
        if len(shape) < 2 or any(v < 1 for v in shape):
            raise DataError(f"bad --input-shape {input_shape!r}: write N,C,H,W (N is ignored), e.g. 1,3,224,224")
        return shape[1:]
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(teacher, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])
    raise DataError("inversion needs the input shape: pass --input-shape N,C,H,W (e.g. 1,3,224,224)")


def bn_layers(teacher: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in teacher.named_modules()
            if is_batchnorm(m) and m.running_mean is not None and m.running_var is not None]


class BNStatLoss:
    """Hooks on the teacher's BN layers adding up the distance of batch to running statistics."""

    def __init__(self, teacher: nn.Module, first_weight: float = 1.0) -> None:
        self.layers = bn_layers(teacher)
        self.first_weight = float(first_weight)
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for _, m in self.layers]

    def _hook(self, m, inp, _out):
        x = inp[0]
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        self.terms.append(torch.linalg.vector_norm(mean - m.running_mean) +
                          torch.linalg.vector_norm(var - m.running_var))

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the plain sum over layers, the sum with the first layer's term weighted by first_weight)."""
        terms = torch.stack(self.terms)
        self.terms = []
        total = terms.sum()
        return total, total + (self.first_weight - 1.0) * terms[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def tv(x: torch.Tensor) -> torch.Tensor:
    parts = [x.diff(dim=d).pow(2).mean() for d in range(2, x.dim()) if x.shape[d] > 1]
    return torch.stack(parts).sum() if parts else x.new_zeros(())


def synthesize(teacher: nn.Module, n: int, shape: tuple[int, ...], *, seed: int = 0, device="cpu",
               dtype=torch.float32, iterations: int = DEFAULTS["iterations"], batch_size: int = DEFAULTS["batch_size"],
               lr: float = DEFAULTS["lr"], ce: float = DEFAULTS["ce"], tv_weight: float = DEFAULTS["tv"],
               l2: float = DEFAULTS["l2"], jitter: int = DEFAULTS["jitter"], first_bn: float = DEFAULTS["first_bn"],
               clamp: tuple[float, float] | None = DEFAULTS["clamp"], history: list | None = None) -> torch.Tensor:
    """N synthesized inputs of per-sample ``shape`` (detached, on CPU). ``history``, if given, gets
    the BN-statistics loss of each batch at the first and the last iteration."""
    if not bn_layers(teacher):
        raise DataError("inversion needs a teacher with BatchNorm running statistics; this teacher has none: "
                        "pass real inputs as DATA")
    modes = [(m, m.training) for m in teacher.modules()]
    grads = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    stats = BNStatLoss(teacher, first_bn)
    spatial = list(range(2, 1 + len(shape)))
    g = torch.Generator().manual_seed(seed)
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b, *shape), generator=g)
            if clamp is not None:
                lo, hi = clamp
                x = (lo + hi) / 2 + (hi - lo) / 4 * x.clamp(-2, 2)
            x = x.to(device=device, dtype=dtype).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            targets = None
            first_loss = last_loss = None
            for it in range(iterations):
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / iterations))
                xin = x
                if jitter and spatial:
                    shifts = [int(v) for v in torch.randint(-jitter, jitter + 1, (len(spatial),), generator=g)]
                    xin = torch.roll(x, shifts=shifts, dims=spatial)
                t_out = teacher(xin)
                bn_loss, weighted = stats.take()
                loss = weighted + tv_weight * tv(x) + l2 * x.pow(2).mean()
                logits = outputs.tensors(t_out)[0]
                if ce > 0 and logits.dim() == 2:
                    if targets is None:
                        k = logits.shape[1]
                        targets = (torch.arange(b) % k)[torch.randperm(b, generator=g)]
                        targets = ((targets + int(torch.randint(k, (1,), generator=g))) % k).to(logits.device)
                    loss = loss + ce * F.cross_entropy(logits, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if clamp is not None:
                    with torch.no_grad():
                        x.clamp_(*clamp)
                first_loss = float(bn_loss.detach()) if first_loss is None else first_loss
                last_loss = float(bn_loss.detach())
            if history is not None:
                history.append((first_loss, last_loss))
            out.append(x.detach().cpu())
    finally:
        stats.close()
        for m, training in modes:
            m.training = training
        for p, req in grads:
            p.requires_grad_(req)
    return torch.cat(out)
