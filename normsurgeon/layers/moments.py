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
SHIFT_VALUES = 16  # values per statistic averaged into the shift k of the float32 partial sums


def moment_sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum_x, sum_x2, count)`` of ``v`` per index of dim 1, reduced over every other dim.

    ``sum_x``/``sum_x2`` are float64 of shape ``(v.shape[1],)``; ``count`` is the number of values
    per statistic. Partial sums (one sample's positions, or for short rows one position across the
    batch) are taken in the activation dtype (~1e-7 relative in float32) and pooled in float64.

    Large means: E[x^2] - E[x]^2 multiplies the float32 error of sum(x^2) by (mean/spread)^2 (a
    variance 20% off at mean 1000, spread 1). Below float64 the sums are then taken of ``x - k`` and
    shifted back in float64. On CPU the plain sums come first and only statistics whose mean exceeds
    10 spreads are summed again around their batch mean (a second pass, rare). On a GPU that check
    would synchronize, so every statistic is shifted by the mean of its first ``SHIFT_VALUES``
    values. The C kernel (normsurgeon/native/moments.c) shifts the GPU way; it costs it nothing.
    """
    v = v.detach()  # no autograd graph (and no no_grad context: this runs in a hook on every call)
    n, c = v.shape[0], v.shape[1]
    if v.dtype in (torch.float16, torch.bfloat16):  # half-precision sums overflow / round too coarsely
        v = v.float()
    last = v.dim() > 2 and not v.is_contiguous()  # e.g. channels_last: reduce (n, positions, c) as a view
    flat = v.movedim(1, -1).reshape(n, -1, c) if last else v.reshape(n, c, -1)
    count = flat.numel() // c if c else 0
    if v.dtype == torch.float64 or count == 0:
        return (*_sums(flat, last, None, count), count)
    if not v.is_cpu:
        return (*_sums(flat, last, _first_mean(flat, last), count), count)
    s, s2 = _sums(flat, last, None, count)
    mean = s / count
    need = torch.isfinite(mean) & (mean * mean > 100 * (s2 / count - mean * mean))
    if bool(need.any()):
        s, s2 = _sums(flat, last, torch.where(need, mean, torch.zeros_like(mean)).to(flat.dtype), count)
    return s, s2, count


def _sums(flat: torch.Tensor, last: bool, k: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 sums of x and x^2 per statistic of ``flat`` ((n, c, per), or (n, per, c) when
    ``last``), taken of ``x - k`` when a shift ``k`` is given (0 entries: no shift)."""
    if k is not None:
        flat = flat - (k if last else k[:, None])
    if last:
        s = flat.sum(dim=1).sum(dim=0, dtype=torch.float64)
        s2 = (flat * flat).sum(dim=1).sum(dim=0, dtype=torch.float64)
    elif flat.shape[2] < SHORT_ROWS and flat.shape[0] <= SHORT_ROWS_MAX_BATCH:
        # Few positions per sample (late stages, BN1d): per-position partials over the batch reduce
        # along a contiguous row of c*per values, much faster than many 1-16 element inner sums.
        s = flat.sum(dim=0).sum(dim=1, dtype=torch.float64)
        s2 = (flat * flat).sum(dim=0).sum(dim=1, dtype=torch.float64)
    else:
        s = flat.sum(dim=2).sum(dim=0, dtype=torch.float64)
        # ||x||^2 per (sample, statistic): one vectorized reduction pass, about 2x faster on CPU than
        # vecdot(x, x) (which multiplies into a temporary first); squaring the float32 norm costs ~1 ulp.
        s2 = torch.linalg.vector_norm(flat, dim=2).square().sum(dim=0, dtype=torch.float64)
    if k is None:
        return s, s2
    k = k.double()
    shifted = k != 0  # where k is 0 the sums pass through, NaN/Inf intact
    return (torch.where(shifted, s + count * k, s), torch.where(shifted, s2 + k * (2 * s + count * k), s2))


def _first_mean(flat: torch.Tensor, last: bool) -> torch.Tensor:
    """Mean of each statistic's first ``SHIFT_VALUES`` values (samples, then positions), 0 if not finite."""
    c = flat.shape[2] if last else flat.shape[1]
    if last:
        first = flat.reshape(-1, c)[:SHIFT_VALUES].t()
    else:
        first = flat[:-(-SHIFT_VALUES // flat.shape[2])].transpose(0, 1).reshape(c, -1)[:, :SHIFT_VALUES]
    k = first.float().mean(dim=1)
    return torch.where(torch.isfinite(k), k, torch.zeros_like(k)).to(flat.dtype)


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
