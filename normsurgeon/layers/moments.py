"""The recalibration protocol shared by every layer that keeps running estimates.

See the protocol description in :mod:`normsurgeon.layers` (``__init__``). This mixin supplies the
generic parts: a layer says how its input is viewed for statistics (``stat_view``) and how pooled
moments become its running buffers (``load_moments``).
"""
from __future__ import annotations


import torch

# Below this many positions per sample, partials are taken over the batch instead (see moment_sums);
# the batch bound keeps those float32 partials short enough to stay ~1e-7 relative.
SHORT_ROWS = 40  # crossover measured on CPU: 36 positions favour batch-wise partials, 49 per-sample ones
SHORT_ROWS_MAX_BATCH = 256


def moment_sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum_x, sum_x2, count)`` of ``v`` per index of dim 1, reduced over every other dim.

    ``sum_x``/``sum_x2`` are float64 of shape ``(v.shape[1],)``; ``count`` is the number of values
    per statistic. Partial sums (one sample's positions, or for short rows one position across the
    batch) are taken in the activation dtype (~1e-7 relative in float32) and pooled in float64.
    """
    v = v.detach()  # no autograd graph (and no no_grad context: this runs in a hook on every call)
    n, c = v.shape[0], v.shape[1]
    if v.dtype in (torch.float16, torch.bfloat16):  # half-precision sums overflow / round too coarsely
        v = v.float()
    if v.dim() > 2 and not v.is_contiguous():  # e.g. channels_last: reduce (n, positions, c) as a view
        flat = v.movedim(1, -1).reshape(n, -1, c)
        per = flat.shape[1]
        return (flat.sum(dim=1).sum(dim=0, dtype=torch.float64),
                (flat * flat).sum(dim=1).sum(dim=0, dtype=torch.float64), n * per)
    flat = v.reshape(n, c, -1)
    per = flat.shape[2]
    if per < SHORT_ROWS and n <= SHORT_ROWS_MAX_BATCH:
        # Few positions per sample (late stages, BN1d): per-position partials over the batch reduce
        # along a contiguous row of c*per values, much faster than many 1-16 element inner sums.
        s = flat.sum(dim=0).sum(dim=1, dtype=torch.float64)
        s2 = (flat * flat).sum(dim=0).sum(dim=1, dtype=torch.float64)
    else:
        s = flat.sum(dim=2).sum(dim=0, dtype=torch.float64)
        # ||x||^2 per (sample, statistic): one vectorized reduction pass, about 2x faster on CPU than
        # vecdot(x, x) (which multiplies into a temporary first); squaring the float32 norm costs ~1 ulp.
        s2 = torch.linalg.vector_norm(flat, dim=2).square().sum(dim=0, dtype=torch.float64)
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
