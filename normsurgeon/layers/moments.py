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
    Below float64 (on CPU: where a statistic's mean dwarfs its spread) they are sums of ``v - k``, ``k`` the
    mean of its first ``SHIFT_VALUES`` values (samples, then positions: an estimate of its mean),
    turned back into sums of ``v`` in float64: unshifted, the float32 error of sum(x^2) reaches
    E[x^2] - E[x]^2 multiplied by (mean/spread)^2 (20% at mean 1000, spread 1); shifted, by
    ((k - mean)/spread)^2, about 1/16. The C kernel (normsurgeon/native/moments.c) always shifts
    (it costs it nothing); here, on CPU, the shift costs a pass, so it is taken only where it matters.
    """
    v = v.detach()  # no autograd graph (and no no_grad context: this runs in a hook on every call)
    n, c = v.shape[0], v.shape[1]
    if v.dtype in (torch.float16, torch.bfloat16):  # half-precision sums overflow / round too coarsely
        v = v.float()
    if v.dim() > 2 and not v.is_contiguous():  # e.g. channels_last: reduce (n, positions, c) as a view
        flat = v.movedim(1, -1).reshape(n, -1, c)
        k = _shift(flat.reshape(-1, c)[:SHIFT_VALUES].t(), v.dtype)
        if k is not None:
            flat = flat - k
        per = flat.shape[1]
        s = flat.sum(dim=1).sum(dim=0, dtype=torch.float64)
        s2 = (flat * flat).sum(dim=1).sum(dim=0, dtype=torch.float64)
        return (*_unshift(s, s2, k, n * per), n * per)
    flat = v.reshape(n, c, -1)
    first = flat[:-(-SHIFT_VALUES // flat.shape[2])] if flat.shape[2] else flat
    k = _shift(first.transpose(0, 1).reshape(c, -1)[:, :SHIFT_VALUES], v.dtype)
    if k is not None:
        flat = flat - k[:, None]
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
    return (*_unshift(s, s2, k, n * per), n * per)


def _shift(first: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The shift per statistic from its first values ``first`` (c, m), 0 where not finite; None in
    float64 (exact enough unshifted). On CPU, where shifting costs a pass over the data, only
    statistics whose mean exceeds 10 times their spread (the float32 error would grow over 100-fold)
    are shifted, and None is returned when none is: the common case. On a GPU the pass is cheap and
    the check would synchronize, so every statistic is shifted."""
    if dtype == torch.float64 or first.numel() == 0:
        return None
    first = first.float()
    k = first.mean(dim=1)
    need = torch.isfinite(k)
    if first.device.type == "cpu":
        var = (first - k[:, None]).square().mean(dim=1)  # torch.var_mean is many times slower on CPU
        need &= k * k > 100 * var
        if not bool(need.any()):
            return None
    return torch.where(need, k, torch.zeros_like(k))


def _unshift(d: torch.Tensor, d2: torch.Tensor, k: torch.Tensor | None, count: int):
    """Sums of x from sums of x - k (float64; where k is 0 the sums pass through, NaN/Inf intact)."""
    if k is None:
        return d, d2
    k = k.double()
    shifted = k != 0
    return (torch.where(shifted, d + count * k, d),
            torch.where(shifted, d2 + k * (2 * d + count * k), d2))


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
