"""Instance Enhancement Batch Normalization (Liang, Huang, Liang, Yang, "Instance Enhancement Batch
Normalization: an Adaptive Regulator of Batch Noise", AAAI 2020; reference code gbup-group/IEBN
``models/cifar/iebn_resnet.py``, class ``_BatchAttNorm``).

BN without its own affine, whose per-channel scale is gated per instance by a sigmoid of the
instance's global average pool of the layer **input** (the reference pools ``input``, before
normalization)::

    g_{n,c} = sigmoid(w_c * GAP(x)_{n,c} + b_c)
    y = gamma_c * g_{n,c} * (x - mu_c) / sqrt(var_c + eps) + beta_c

Constants from the reference: w (``weight_readjust``) init 0, b (``bias_readjust``) init -1 (so the
gate starts at sigmoid(-1) = 0.269 for every instance), gamma init 1, beta init 0, eps 1e-5, momentum
0.1; batch statistics in training, running statistics at eval (BN's own F.batch_norm).

Folding (exact). At eval mu, sigma = sqrt(running_var + eps) are constants. Write u = (x - mu) / sigma,
the normalized activation. Then GAP(x) = sigma * GAP(u) + mu, so::

    g = sigmoid((w * sigma) * GAP(u) + (w * mu + b))
    y = gamma * u * g + beta

The layer therefore splits into a per-channel affine ``x -> u`` (:meth:`eval_affine`, scale 1/sigma,
shift -mu/sigma), which ``fold`` moves into the producing conv, followed by :class:`IEBNGate` (the
``act`` child, the extras protocol of ``normsurgeon.layers.norm_act``), which computes
``gamma * u * sigmoid(a * GAP(u) + c) + beta`` with ``a = w * sigma`` and ``c = w * mu + b`` taken
from the running statistics at the moment it is read. The gate cannot go into the conv (it depends on
each instance), so a folded model keeps this small layer; fold is exact up to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.layers.moments import MeanVarMoments, channel_shape

IEBN_GATE_WEIGHT = 0.0  # reference: weight_readjust.fill_(0)
IEBN_GATE_BIAS = -1.0  # reference: bias_readjust.fill_(-1)


def _gap(x: torch.Tensor) -> torch.Tensor:
    """Per-instance, per-channel mean over every position: (N, C)."""
    return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x


class IEBNGate(nn.Module):
    """``y = weight * u * sigmoid(gate_scale * GAP(u) + gate_shift) + bias`` over dim 1, u normalized.

    The eval-time remainder of an IEBN layer after its normalization is folded away. In an unfolded
    :class:`InstanceEnhancedBatchNorm` it holds the trainable gamma/beta (``weight``/``bias``) and the
    gate parameters (``gate_weight`` w, ``gate_bias`` b); ``gate_scale``/``gate_shift`` are the gate
    rewritten in the normalized coordinates, buffers refreshed by the parent whenever it is read.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.gate_weight = nn.Parameter(torch.full((num_features,), IEBN_GATE_WEIGHT))
        self.gate_bias = nn.Parameter(torch.full((num_features,), IEBN_GATE_BIAS))
        self.register_buffer("gate_scale", torch.zeros(num_features))
        self.register_buffer("gate_shift", torch.full((num_features,), IEBN_GATE_BIAS))

    def gated(self, u: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``weight * u * sigmoid(logits) + bias`` with per-instance gate logits (N, C)."""
        g = torch.sigmoid(logits)
        shape = (g.shape[0], -1) + (1,) * (u.dim() - 2)
        return u * (self.weight * g).reshape(shape) + self.bias.reshape(channel_shape(u))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.gated(u, _gap(u) * self.gate_scale + self.gate_shift)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


class InstanceEnhancedBatchNorm(MeanVarMoments, nn.Module):
    """IEBN over dim 1 of any input rank >= 2 (GAP over all positions; (N, C) inputs gate on x itself)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.act = IEBNGate(num_features)  # named ``act``: fold keeps it after folding eval_affine

    @property
    def weight(self) -> nn.Parameter:
        return self.act.weight

    @property
    def bias(self) -> nn.Parameter:
        return self.act.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training, self.momentum, self.eps)
        w, b = self.act.gate_weight, self.act.gate_bias
        if self.training:
            return self.act.gated(u, _gap(x) * w + b)
        # eval: the same gate in normalized coordinates (what the folded IEBNGate computes)
        sigma = torch.sqrt(self.running_var + self.eps)
        return self.act.gated(u, _gap(u) * (w * sigma) + (w * self.running_mean + b))

    @torch.no_grad()
    def sync_gate(self) -> None:
        """Rewrite the gate in normalized coordinates from the running statistics (see module docstring)."""
        sigma = torch.sqrt(self.running_var + self.eps)
        w = self.act.gate_weight.detach()
        self.act.gate_scale.copy_(w * sigma)
        self.act.gate_shift.copy_(w * self.running_mean + self.act.gate_bias.detach())

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalization ``x -> u`` only; the gated rest is the ``act`` child (synced here)."""
        self.sync_gate()
        inv = torch.rsqrt(self.running_var + self.eps)
        return inv, -self.running_mean * inv

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
