"""The recalibration protocol shared by every layer that keeps running estimates.

See the protocol description in :mod:`normsurgeon.layers` (``__init__``). This mixin supplies the
generic parts: a layer says how its input is viewed for statistics (``stat_view``) and how pooled
moments become its running buffers (``load_moments``).
"""
from __future__ import annotations

import torch

# Below this many positions per sample, partials are taken over the batch instead (see moment_sums).
SHORT_ROWS = 40  # crossover measured on CPU: 36 positions favour batch-wise partials, 49 per-sample ones
# Where a statistic's squared mean exceeds this many variances, raw float32 sums of squares would
# lose more than ~1e-5 of its variance: such statistics get centred partials instead.
CENTRE_RATIO = 100.0


def moment_sums(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum_x, sum_x2, count)`` of ``v`` per index of dim 1, reduced over every other dim.

    ``sum_x``/``sum_x2`` are float64 of shape ``(v.shape[1],)``; ``count`` is the number of values
    per statistic. Partial means and biased variances are taken over contiguous runs (one sample's
    positions, or for short rows one position across the batch) and merged in float64 with Chan's
    parallel formula: the pooled mean, and the partials' sums of squared deviations plus each
    partial's count times its mean's squared distance to the pooled mean.

    The partials come from ``torch.var_mean`` (centred, exact to the activation dtype whatever the
    mean) on GPUs and in float64. On CPU that reduction is 3-6x slower than a plain sum, so float32
    partials come from a sum and a sum of squares (as exact as the float32 values themselves while
    mean^2 <= ``CENTRE_RATIO`` * variance); only statistics beyond that ratio are taken again with
    ``torch.var_mean``. Any layout (channels_last included); NaN/Inf pass through.
    """
    v = v.detach()  # no autograd graph (and no no_grad context: this runs on every call of the pass)
    n, c = v.shape[0], v.shape[1]
    if v.dtype in (torch.float16, torch.bfloat16):  # half-precision sums overflow / round too coarsely
        v = v.float()
    count = v.numel() // c if c else 0
    if count == 0:
        z = torch.zeros(c, dtype=torch.float64, device=v.device)
        return z, z.clone(), 0
    last = v.dim() > 2 and not v.is_contiguous()  # e.g. channels_last: (n, positions, c) as a view
    if last:
        flat, dim, axis = v.movedim(1, -1).reshape(n, -1, c), 1, 0
    else:
        flat = v.reshape(n, c, -1)
        dim = 2 if flat.shape[2] >= SHORT_ROWS else 0
        axis = 0 if dim == 2 else 1  # the partials' axis that is not the channel axis
    per = flat.shape[dim]  # values behind each partial
    if v.is_cpu and v.dtype == torch.float32:
        mean = flat.sum(dim=dim).double() / per
        sq = torch.linalg.vector_norm(flat, dim=dim).double().square() / per
        var = (sq - mean * mean).clamp_min(0)
        pooled, m2 = _chan(mean, var, per, axis)
        risky = torch.isfinite(pooled) & (pooled * pooled > CENTRE_RATIO * m2 / count)
        if bool(risky.any()):
            idx = risky.nonzero().flatten()
            part = flat.index_select(2 if last else 1, idx)
            pv, pm = torch.var_mean(part, dim=dim, correction=0)
            pooled[idx], m2[idx] = _chan(pm.double(), pv.double(), per, axis)
    else:
        var, mean = torch.var_mean(flat, dim=dim, correction=0)
        pooled, m2 = _chan(mean.double(), var.double(), per, axis)
    return pooled * count, m2 + pooled * pooled * count, count


def _chan(mean: torch.Tensor, var: torch.Tensor, per: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge equal-sized partials (``per`` values each; partials along ``axis``): the pooled mean and
    the pooled sum of squared deviations (Chan et al.'s parallel formula)."""
    pooled = mean.mean(dim=axis)
    centre = pooled if axis == 0 else pooled[:, None]
    return pooled, per * (var.sum(dim=axis) + (mean - centre).square().sum(dim=axis))


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


def running_affine(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` a BN-like layer applies at eval from its running statistics:
    ``weight / sqrt(running_var + eps)`` and ``bias - running_mean * scale`` (the fold protocol's
    ``eval_affine`` of every such layer)."""
    scale = layer.weight * torch.rsqrt(layer.running_var + layer.eps)
    return scale, layer.bias - layer.running_mean * scale


def apply_running_affine(layer, x: torch.Tensor) -> torch.Tensor:
    """``x`` normalized with the layer's running statistics and affine (its eval function)."""
    scale, shift = running_affine(layer)
    shape = channel_shape(x)
    return x * scale.reshape(shape) + shift.reshape(shape)


def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``(1, -1, 1, ...)``: broadcast a per-channel vector over an input of x's rank."""
    return (1, -1) + (1,) * (x.dim() - 2)
