"""The recalibration protocol shared by every layer that keeps running estimates.

See the protocol description in :mod:`normsurgeon.layers` (``__init__``). This mixin supplies the
generic parts: a layer says how its input is viewed for statistics (``stat_view``) and how pooled
moments become its running buffers (``load_moments``).
"""
from __future__ import annotations


import torch


@torch.no_grad()
def moment_sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum_x, sum_x2, count)`` of ``v`` per index of dim 1, reduced over every other dim.

    ``sum_x``/``sum_x2`` are float64 of shape ``(v.shape[1],)``; ``count`` is the number of values
    per statistic.
    """
    v = v.detach()
    n, c = v.shape[0], v.shape[1]
    flat = v.reshape(n, c, -1)
    per = flat.shape[2]
    s = flat.sum(dim=2).double().sum(dim=0)
    s2 = torch.linalg.vecdot(flat, flat, dim=2).double().sum(dim=0)
    return s, s2, n * per


class RunningMoments:
    """Mixin for layers with running estimates: exact per-batch moment sums in float64.

    ``stat_view(x)`` reshapes an input so that dim 1 indexes the layer's statistics (channels for a
    per-channel BN, groups for batch-group norm); every other dim is reduced.
    """

    def stat_view(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def moment_axes(self, x: torch.Tensor) -> tuple[int, ...]:
        """The axes of ``stat_view(x)`` that one statistic reduces over (all but dim 1)."""
        return tuple(d for d in range(self.stat_view(x).dim()) if d != 1)

    def batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(sum_x, sum_x2, count)`` for one batch, float64, shaped like the running buffers."""
        return moment_sums(self.stat_view(x))

    def load_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:  # pragma: no cover
        raise NotImplementedError


class MeanVarMoments(RunningMoments):
    """Mixin for layers whose running estimates are ``running_mean``/``running_var`` (reset to 0 / 1)."""

    def reset_running_stats(self) -> None:
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def load_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:
        set_mean_var(self, mean, sq_mean)


def set_mean_var(layer, mean: torch.Tensor, sq_mean: torch.Tensor) -> None:
    """Set ``running_mean``/``running_var`` from E[x] and E[x^2] (population variance, clamped >= 0)."""
    with torch.no_grad():
        mean64, sq64 = mean.double(), sq_mean.double()
        var = (sq64 - mean64 * mean64).clamp_min(0)
        layer.running_mean.copy_(mean64.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))


def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``(1, -1, 1, ...)``: broadcast a per-channel vector over an input of x's rank."""
    return (1, -1) + (1,) * (x.dim() - 2)
