"""The generalized batch normalization of "Four Things Everyone Should Know to Improve Batch
Normalization" (Summers & Dinneen, ICLR 2020; ceciliaresearch/four_things_batch_norm,
``normalization.py`` at 3d281c3, TF1; decay 0.99, eps 1e-5, moving_x2 init 1 confirmed there).

One layer covers BN, Ghost BN, "Batch/Group" normalization and inference example weighting:

- statistics over groups of ``examples_per_group`` samples (None: the whole batch) times
  ``channels_per_group`` channels, from sufficient statistics: per example and channel
  ``a = mean_spatial(x)``, ``q = mean_spatial(x^2)``; per group ``mu = mean(a)``,
  ``sigma^2 = mean(q) - mu^2`` (biased); ``y = gamma (x - mu) / sqrt(sigma^2 + eps) + beta``,
  eps 1e-5. A batch whose size is not a multiple of ``examples_per_group`` gets a smaller last group
  (the reference assumes divisibility).
- moving averages of E[x] (``running_mean``, init 0) and E[x^2] (``running_sq_mean``, init 1),
  decay 0.99, always over the **whole batch**, per channel.
- inference example weighting with ``alpha`` (reference ``example_eval_weight``, default 0): the
  moving and the example's own statistics, each averaged over the channel group, are mixed:
  ``m = (1-alpha) E_pop[x] + alpha E_ex[x]``, ``s = (1-alpha) E_pop[x^2] + alpha E_ex[x^2]``,
  ``sigma^2 = s - m^2``. With alpha = 0 eval is a constant per-channel affine (:meth:`eval_affine`,
  folds backward); with alpha > 0 it depends on the example (batch-independent, not foldable).
"""
from __future__ import annotations

import torch
from torch import nn

from normsurgeon.layers.moments import RunningMoments

FOUR_THINGS_EPS = 1e-5
FOUR_THINGS_DECAY = 0.99


class GeneralizedBatchNorm(RunningMoments, nn.Module):
    def __init__(self, num_features: int, examples_per_group: int | None = None, channels_per_group: int = 1,
                 alpha: float = 0.0, eps: float = FOUR_THINGS_EPS, decay: float = FOUR_THINGS_DECAY) -> None:
        super().__init__()
        if num_features % channels_per_group:
            raise ValueError(f"{num_features} channels do not split into groups of {channels_per_group}")
        if examples_per_group is not None and examples_per_group < 1:
            raise ValueError("examples_per_group must be a positive integer")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must lie in [0, 1]")
        self.num_features = num_features
        self.examples_per_group = examples_per_group
        self.channels_per_group = channels_per_group
        self.alpha = float(alpha)
        self.eps = eps
        self.decay = decay
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_sq_mean", torch.ones(num_features))

    # ------------------------------------------------------------------ recalibration protocol
    def reset_running_stats(self) -> None:
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_sq_mean.fill_(1.0)

    def load_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:
        with torch.no_grad():
            self.running_mean.copy_(mean.to(self.running_mean.dtype))
            self.running_sq_mean.copy_(sq_mean.to(self.running_sq_mean.dtype))

    # ------------------------------------------------------------------ helpers
    def _channel_group_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a (..., C) tensor over each channel group, expanded back to (..., C)."""
        k = self.channels_per_group
        if k == 1:
            return t
        g = t.reshape(*t.shape[:-1], -1, k).mean(dim=-1, keepdim=True)
        return g.expand(*g.shape[:-1], k).reshape(t.shape)

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
        """x with per-(example, channel) statistics ``mean``/``sq_mean`` of shape (N or 1, C)."""
        var = (sq_mean - mean * mean).clamp_min(0)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        shape = (scale.shape[0], -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    def _example_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = tuple(range(2, x.dim()))
        if not dims:
            return x, x * x
        return x.mean(dim=dims), (x * x).mean(dim=dims)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, q = self._example_stats(x)  # (N, C)
        if self.training:
            with torch.no_grad():
                d = self.decay
                self.running_mean.mul_(d).add_((1 - d) * a.detach().mean(0).to(self.running_mean.dtype))
                self.running_sq_mean.mul_(d).add_((1 - d) * q.detach().mean(0).to(self.running_sq_mean.dtype))
            e = self.examples_per_group or x.shape[0]
            mus, sqs = [], []
            for a_g, q_g in zip(a.split(e), q.split(e)):
                mu = self._channel_group_mean(a_g.mean(0, keepdim=True)).expand_as(a_g)
                sq = self._channel_group_mean(q_g.mean(0, keepdim=True)).expand_as(q_g)
                mus.append(mu)
                sqs.append(sq)
            return self._normalize(x, torch.cat(mus), torch.cat(sqs))
        pop_m = self._channel_group_mean(self.running_mean.to(x.dtype)).unsqueeze(0)
        pop_s = self._channel_group_mean(self.running_sq_mean.to(x.dtype)).unsqueeze(0)
        if self.alpha == 0:
            return self._normalize(x, pop_m, pop_s)
        al = self.alpha
        m = (1 - al) * pop_m + al * self._channel_group_mean(a)
        s = (1 - al) * pop_s + al * self._channel_group_mean(q)
        return self._normalize(x, m, s)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Constant per-channel affine at eval when alpha == 0; None otherwise (example-dependent)."""
        if self.alpha != 0:
            return None
        m = self._channel_group_mean(self.running_mean)
        s = self._channel_group_mean(self.running_sq_mean)
        scale = self.weight * torch.rsqrt((s - m * m).clamp_min(0) + self.eps)
        return scale, self.bias - m * scale

    def extra_repr(self) -> str:
        e = self.examples_per_group if self.examples_per_group is not None else "batch"
        return (f"{self.num_features}, examples_per_group={e}, channels_per_group={self.channels_per_group}, "
                f"alpha={self.alpha:g}, eps={self.eps}")


