"""Batch-Channel Normalization (Qiao, Wang, Liu, Shen, Yuille, "Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization"; joe-siyuan-qiao/Batch-Channel-Normalization,
README ``BCNorm``/``EstBN`` at 15aa060d (EstBN update order, old-mean centring and eps 1e-5
confirmed there) and ``imagenet/models/layers.py``).

``BCN(x) = ChannelNorm(BatchNorm(x))``, built as a :class:`BatchChannelNorm` container with two
children so ``fold`` can fold the batch part backward into the producing conv and keep the channel
part:

- ``bn``: :class:`EstimatedBatchNorm`, a BN with its own per-channel affine. ``estimate=False``: the
  large-batch form (batch statistics in training, like BatchNorm2d, eps 1e-5, momentum 0.1).
  ``estimate=True``: the micro-batch ``EstBN`` form: it normalizes with its **running estimates in
  training too**, after a no-grad update ``mean <- (1-r) mean + r mu_B``,
  ``var <- (1-r) var + r mean((x - old_mean)^2)`` (centred on the *old* running mean, as in the
  reference). The reference keeps r in a buffer initialised to 0 and never sets it, which makes the
  layer a no-op; here r (``rate``, buffer ``estimate_rate``) defaults to 0.1 (a normsurgeon choice,
  BN's default momentum; no value is verified from the paper).
- ``cn``: :class:`ChannelGroupNorm`, a GroupNorm-style normalization (32 groups, eps 1e-5, no
  running statistics) whose affine is **per group** (shape G, init 1 and 0), not per channel.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.layers.moments import MeanVarMoments, apply_running_affine, channel_shape, running_affine

BCN_GROUPS = 32  # BCN repo: layers.py overrides BatchNorm2d with BCNorm(num_groups=32)
BCN_EPS = 1e-5  # EstBN hard-codes 1e-5; BCNorm's channel part takes eps=1e-5 in layers.py
DEFAULT_RATE = 0.1  # normsurgeon choice; the reference leaves r at 0 (see module docstring)


class EstimatedBatchNorm(MeanVarMoments, nn.Module):
    """BCN's batch part: per-channel BN with affine; ``estimate=True`` is the EstBN micro-batch form.

    Not a ``_BatchNorm`` subclass on purpose (``convert`` would convert it again). Eval is the
    constant affine of :meth:`eval_affine`.
    """

    def __init__(self, num_features: int, eps: float = BCN_EPS, estimate: bool = True,
                 rate: float = DEFAULT_RATE, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.estimate = estimate
        self.momentum = momentum  # large-batch form only (BN's running-stat momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("estimate_rate", torch.tensor(float(rate)))

    @torch.no_grad()
    def _update_estimates(self, x: torch.Tensor) -> None:
        r = float(self.estimate_rate)
        dims = self.moment_axes(x)
        mu = x.mean(dim=dims)
        centred = x - self.running_mean.reshape(channel_shape(x)).to(x.dtype)
        v = centred.pow(2).mean(dim=dims)
        self.running_mean.mul_(1 - r).add_(r * mu.to(self.running_mean.dtype))
        self.running_var.mul_(1 - r).add_(r * v.to(self.running_var.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.estimate:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                True, self.momentum, self.eps)
        if self.training:
            self._update_estimates(x.detach())
        return apply_running_affine(self, x)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return running_affine(self)

    def extra_repr(self) -> str:
        mode = f"estimate, rate={float(self.estimate_rate):g}" if self.estimate else "batch statistics"
        return f"{self.num_features}, eps={self.eps}, {mode}"


class ChannelGroupNorm(nn.Module):
    """BCN's channel part: per-sample statistics over each of G channel groups, per-group affine."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = BCN_EPS) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_groups))
        self.bias = nn.Parameter(torch.zeros(num_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.num_groups, None, None, self.eps)
        n = x.shape[0]
        y = y.reshape(n, self.num_groups, -1) * self.weight.reshape(1, -1, 1) + self.bias.reshape(1, -1, 1)
        return y.reshape(x.shape)

    def per_channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-group affine expanded exactly to per-channel (e.g. for a GroupNorm with affine)."""
        k = self.num_channels // self.num_groups
        return self.weight.repeat_interleave(k), self.bias.repeat_interleave(k)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, per-group affine"


class BatchChannelNorm(nn.Sequential):
    """``cn(bn(x))``. A plain container: tracing goes through it, so fold sees ``bn`` and ``cn``."""

    def __init__(self, bn: EstimatedBatchNorm, cn: ChannelGroupNorm) -> None:
        super().__init__(OrderedDict([("bn", bn), ("cn", cn)]))

    @classmethod
    def create(cls, num_features: int, groups: int = BCN_GROUPS, eps: float = BCN_EPS, estimate: bool = True,
               rate: float = DEFAULT_RATE) -> "BatchChannelNorm":
        return cls(EstimatedBatchNorm(num_features, eps, estimate, rate), ChannelGroupNorm(groups, num_features, eps))
