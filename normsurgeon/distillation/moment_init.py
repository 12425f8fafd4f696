"""Stage 1, data-driven start: give each replaced norm the output moments the teacher's BN had there.

A converted student keeps the BN's affine (gamma, beta), but its new norm normalizes with other
statistics (per sample and group instead of running per-channel averages), so the per-channel mean
and spread of its output no longer match what the next layer was trained on. For every student
module that sits where the teacher has a BatchNorm (same qualified name), has a per-channel affine
(``weight`` and ``bias`` of C values) and returns ``(N, C, ...)``, this sets

    weight' = weight * std_T / std_S,    bias' = mean_T + (bias - mean_S) * std_T / std_S

per channel, where mean/std are taken over one batch of DATA (batch and positions) of the teacher's
BN output and of the student's norm output. The student's output at that layer then has the
teacher's per-channel mean and standard deviation over the data exactly. Layers are fitted in
forward order in one pass: each hook fixes its layer, then feeds the corrected output downstream,
so later layers are fitted to the corrected upstream activations.
"""
from __future__ import annotations

import torch
from torch import nn

from normsurgeon.graph.modules import is_batchnorm

MIN_STD = 1e-6


def norm_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, student module) for every teacher BN whose student counterpart is a norm with a
    per-channel affine (not itself a BN: those keep their own statistics)."""
    s_mods = dict(student.named_modules())
    pairs = []
    for name, t in teacher.named_modules():
        if not is_batchnorm(t) or name not in s_mods:
            continue
        s = s_mods[name]
        w, b = getattr(s, "weight", None), getattr(s, "bias", None)
        if is_batchnorm(s) or not isinstance(w, nn.Parameter) or not isinstance(b, nn.Parameter):
            continue
        if w.dim() != 1 or w.shape != b.shape or w.shape[0] != t.num_features:
            continue
        pairs.append((name, s))
    return pairs


def _channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(y.dim()) if d != 1]
    var, mean = torch.var_mean(y.double(), dim=dims, correction=0)
    return mean, var.sqrt()


def moment_init(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> list[str]:
    """Fit the affine of every paired norm in ``student`` (in place) on batch ``x``; returns the
    names of the layers fitted. The teacher only runs forward."""
    pairs = norm_pairs(student, teacher)
    if not pairs:
        return []
    t_mods = dict(teacher.named_modules())
    target: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def record(name):
        def hook(_m, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                target[name] = _channel_moments(out)
        return hook

    def fit(name):
        def hook(m, _inp, out):
            if name not in target or not isinstance(out, torch.Tensor) or out.dim() < 2 \
                    or out.shape[1] != m.weight.shape[0]:
                return None
            t_mean, t_std = target[name]
            s_mean, s_std = _channel_moments(out)
            ok = (s_std > MIN_STD) & (m.weight.detach().double().abs() > MIN_STD)
            scale = torch.where(ok, t_std / s_std.clamp_min(MIN_STD), torch.ones_like(s_std))
            shift = torch.where(ok, t_mean - s_mean * scale, torch.zeros_like(s_mean))
            with torch.no_grad():
                m.weight.copy_((m.weight.double() * scale).to(m.weight.dtype))
                m.bias.copy_((m.bias.double() * scale + shift).to(m.bias.dtype))
            shape = [1, -1] + [1] * (out.dim() - 2)
            return (out.double() * scale.view(shape) + shift.view(shape)).to(out.dtype)
        return hook

    try:
        for name, _ in pairs:
            handles.append(t_mods[name].register_forward_hook(record(name)))
        with torch.no_grad():
            teacher(x)
        for h in handles:
            h.remove()
        handles = [s.register_forward_hook(fit(name)) for name, s in pairs]
        with torch.no_grad():
            student(x)
    finally:
        for h in handles:
            h.remove()
    return [name for name, _ in pairs if name in target]
