"""Batch Group Normalization (Zhou et al. 2020, arXiv 2012.02782).

No official code; the closest implementation is ``Howal/Cross-iterationBatchNorm``
``mmdet/ops/normalize/batch_group_norm.py`` at 87551cc7 (third-party; inner ``BatchNorm1d(G)``
on an (N, G, C/G*H*W) view confirmed there). Forward: view x as (N, G, C*H*W/G) -- G
contiguous chunks of the (C, spatial) values -- and batch-normalize each chunk over (N, chunk),
with running mean/var **per group** (BatchNorm1d(G) semantics: momentum 0.1, running var updated
with the unbiased batch variance), then a per-channel affine. G = C is BN; G < C dividing C makes
each chunk C/G whole channels; G > C splits spatial positions too. The mmdet affine init is
uniform(0, 1) (a legacy mmdet choice); here weight starts at 1 (or is carried over from a BN).
No default G is verified from the paper: pass it explicitly.

At eval, with G dividing C, the running group statistics expanded to channels make BGN a constant
per-channel affine (:meth:`eval_affine`), which folds backward exactly. With G > C it is not one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.layers.moments import MeanVarMoments, channel_shape


class BatchGroupNorm(MeanVarMoments, nn.Module):
    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))

    def stat_view(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() % self.num_groups:
            raise ValueError(
                f"BatchGroupNorm: {x[0].numel()} values per sample do not split into {self.num_groups} groups")
        return x.reshape(x.shape[0], self.num_groups, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.batch_norm(self.stat_view(x), self.running_mean, self.running_var, None, None,
                         self.training, self.momentum, self.eps)
        shape = channel_shape(x)
        return v.reshape(x.shape) * self.weight.reshape(shape) + self.bias.reshape(shape)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel constant affine at eval; None when G does not divide C (groups split positions)."""
        c, g = self.num_features, self.num_groups
        if g > c or c % g:
            return None
        k = c // g
        mean = self.running_mean.repeat_interleave(k)
        inv = torch.rsqrt(self.running_var.repeat_interleave(k) + self.eps)
        scale = self.weight * inv
        return scale, self.bias - mean * scale

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.num_groups}, eps={self.eps}"
