"""Layer-wise matching: alongside the outputs, the student's norm outputs are pulled towards the
teacher's BatchNorm outputs at the same layers.

For every teacher BatchNorm whose student counterpart (same qualified name) returns a tensor of the
same shape, the term is the mean over samples, channels and positions of

    (s - t)^2 / v_c,    v_c = max(gamma_c^2, 1e-2 * mean(gamma^2), 1e-8)

where ``t`` is the teacher's BN output, ``s`` the student's and ``gamma`` the teacher BN's scale: a BN
output has per-channel variance about ``gamma_c^2``, so every layer and channel weighs about the same
whatever its scale. The normalizer is fixed (not a batch statistic), so the loss of a batch is the
mean of per-sample losses and data-parallel gradient averaging stays exact. The feature term is the
mean over the matched layers, times a weight, added to the output loss.

Off by default (weight 0): on the digits benchmark it made GroupNorm students agree with the
teacher on every held-out sample but cost InstanceNorm students a sample or two, and it adds 5-20%
to the time of a step (docs/distill.md has the figures).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.graph.modules import is_batchnorm


def _normalizer(bn: nn.Module) -> torch.Tensor:
    w = getattr(bn, "weight", None)
    if w is None:
        return torch.ones(bn.num_features)
    g2 = w.detach().double().pow(2)
    return torch.clamp(g2, min=max(1e-2 * float(g2.mean()), 1e-8))


class FeatureTaps:
    """Forward hooks on matched layers of student and teacher; :meth:`loss` after both forwards."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s_mods = dict(student.named_modules())
        self.names: list[str] = []
        self._norm: dict[str, torch.Tensor] = {}
        self._s: dict[str, torch.Tensor] = {}
        self._t: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, t in teacher.named_modules():
            if not is_batchnorm(t) or name not in s_mods:
                continue
            self.names.append(name)
            self._norm[name] = _normalizer(t).rsqrt()
            self._handles.append(t.register_forward_hook(self._keep(self._t, name, detach=True)))
            self._handles.append(s_mods[name].register_forward_hook(self._keep(self._s, name, detach=False)))

    @staticmethod
    def _keep(store: dict, name: str, detach: bool):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                store[name] = out.detach() if detach else out
        return hook

    def _scale(self, name: str, s: torch.Tensor) -> torch.Tensor:
        r = self._norm[name]
        if r.device != s.device or r.dtype != torch.float32 or r.dim() != s.dim():
            r = r.to(device=s.device, dtype=torch.float32).view(1, -1, *([1] * (s.dim() - 2)))
            self._norm[name] = r
        return r

    def loss(self) -> torch.Tensor | None:
        """Mean over the layers both models ran this step with equal shapes; None when there are none."""
        parts = []
        for name in self.names:
            s, t = self._s.get(name), self._t.get(name)
            if s is None or t is None or s.shape != t.shape or s.dim() < 2:
                continue
            r = self._scale(name, s)
            parts.append(F.mse_loss(s.float() * r, t.float() * r))
        self._s.clear()
        self._t.clear()
        return torch.stack(parts).mean() if parts else None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
