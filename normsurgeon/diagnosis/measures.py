"""The per-layer measures of ``diagnose``: pure functions on float64 tensors.

Every function takes exact pooled statistics (means, mean squares, variances per channel, from
:class:`~normsurgeon.calibrate.stats.PooledMoments`) or per-sample features, and returns plain
floats or per-channel tensors. Conventions: a "channel" is dim 1 of an activation (the last dim for
token-wise norms such as ``nn.LayerNorm(C)`` on ``(N, L, C)``); "positions" are every other dim but
the sample dim 0. 0/0 (an all-zero layer) is 0 for every ratio.

- **staleness**: ``shift_c = |mu_data - mu_run| / sqrt(var_run + eps)`` and
  ``log_var_c = log((var_data + eps) / (var_run + eps))`` (data = the norm's input on DATA,
  population variance over samples and positions; run = the running estimates it normalizes with).
- **collapse** (Labatie et al. 2021, "Proxy-Normalizing Activations", the power decomposition): the
  share of a tensor's power ``E[y^2]`` held by its channel-wise constant component ``mu_c^2``,
  ``sum_c mu_c^2 / sum_c E[y_c^2]``. 0 for zero-mean channels, 1 when every channel is a constant.
- **flat channels**: the fraction of channels whose variance over samples and positions is at most
  ``FLAT_TOL`` times the layer's mean power (constant channels, dead ones included).
- **dead channels**: the fraction of channels whose power ``E[y_c^2]`` is at most ``DEAD_TOL`` times
  the layer's mean power (~always zero).
- **instance variability**: how much per-sample channel statistics move across samples relative to
  the pooled spread: ``sum_c Var_x(m_xc) / sum_c Var(y_c)`` for per-sample channel means ``m_xc``
  (the between-sample share of the variance, in [0, 1] by the law of total variance) and
  ``sum_c Var_x(s_xc) / sum_c Var(y_c)`` for per-sample channel standard deviations ``s_xc``.
  Identical samples give 0; instance norms pin per-sample means (0 after IN).
- **similarity** to a teacher: linear CKA (Kornblith et al. 2019) of per-sample pooled features
  (``(N, C)`` each, channel counts may differ), and the mean per-sample cosine when they match.
"""
from __future__ import annotations

import torch

FLAT_TOL = 1e-4  # variance <= 1e-4 x mean power: a constant channel
DEAD_TOL = 1e-6  # power <= 1e-6 x mean power: a channel that is ~always zero


def _ratio(num: torch.Tensor | float, den: torch.Tensor | float) -> float:
    num, den = float(num), float(den)
    return 0.0 if den <= 0 else num / den


def channels_first(y: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    """``y`` as ``(N, C, positions)`` in its own dtype (float32 for half types; channel dim moved to 1
    when ``channel_last``). No float64 copy of a large activation is made: reductions of it give
    per-sample / per-channel partials that are pooled in float64."""
    y = y.detach()
    if y.dim() == 1:
        y = y.unsqueeze(1)
    if channel_last and y.dim() > 2:
        y = y.movedim(-1, 1)
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()
    return y.reshape(y.shape[0], y.shape[1], -1)


def per_sample_stats(y: torch.Tensor, channel_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel means and population standard deviations over positions, ``(N, C)`` float64
    (computed in the activation's dtype by torch's two-pass ``var_mean``, then widened)."""
    v = channels_first(y, channel_last)
    var, m = torch.var_mean(v, dim=2, correction=0)
    return m.double(), var.double().sqrt()


def staleness(mean_data: torch.Tensor, var_data: torch.Tensor, mean_run: torch.Tensor, var_run: torch.Tensor,
              eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(shift, log_var_ratio)`` of data statistics against running estimates."""
    mean_data, var_data = mean_data.double(), var_data.double()
    mean_run, var_run = mean_run.double().reshape(mean_data.shape), var_run.double().reshape(var_data.shape)
    shift = (mean_data - mean_run).abs() / (var_run.clamp_min(0) + eps).sqrt()
    log_var = torch.log((var_data.clamp_min(0) + eps) / (var_run.clamp_min(0) + eps))
    return shift, log_var


def collapse(mean: torch.Tensor, sq_mean: torch.Tensor) -> float:
    """Share of the power in the channel-wise constant component: ``sum mu^2 / sum E[y^2]``."""
    return min(1.0, _ratio(mean.double().square().sum(), sq_mean.double().sum()))


def flat_fraction(var: torch.Tensor, sq_mean: torch.Tensor, tol: float = FLAT_TOL) -> float:
    """Fraction of channels with variance <= ``tol`` x the mean power of the layer."""
    scale = float(sq_mean.double().mean())
    if var.numel() == 0:
        return 0.0
    if scale <= 0:
        return 1.0
    return float((var.double() <= tol * scale).double().mean())


def dead_fraction(sq_mean: torch.Tensor, tol: float = DEAD_TOL) -> float:
    """Fraction of channels whose power is <= ``tol`` x the layer's mean power (all dead if it is 0)."""
    sq = sq_mean.double()
    if sq.numel() == 0:
        return 0.0
    scale = float(sq.mean())
    if scale <= 0:
        return 1.0
    return float((sq <= tol * scale).double().mean())


def instance_variability(sample_mean_var: torch.Tensor, sample_std_var: torch.Tensor,
                         pooled_var: torch.Tensor) -> tuple[float, float]:
    """``(means, stds)``: between-sample variance of per-sample channel means / stds over the pooled
    variance, summed over channels."""
    total = pooled_var.double().sum()
    return (_ratio(sample_mean_var.double().sum(), total), _ratio(sample_std_var.double().sum(), total))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with one row per sample (columns may differ)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.double().reshape(x.shape[0], -1)
    y = y.double().reshape(y.shape[0], -1)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    if x.shape[1] + y.shape[1] > x.shape[0]:  # sample-space form: N x N Gram matrices
        kx, ky = x @ x.T, y @ y.T
        num, dx, dy = (kx * ky).sum(), kx.square().sum().sqrt(), ky.square().sum().sqrt()
    else:
        num = (y.T @ x).square().sum()
        dx, dy = (x.T @ x).square().sum().sqrt(), (y.T @ y).square().sum().sqrt()
    return _ratio(num, dx * dy)


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Mean over samples of the cosine between per-sample features; None when the widths differ."""
    x = x.double().reshape(x.shape[0], -1)
    y = y.double().reshape(y.shape[0], -1)
    if x.shape != y.shape or x.shape[0] == 0:
        return None
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    dots = (x * y).sum(dim=1)
    cos = torch.where((nx > 0) & (ny > 0), dots / (nx * ny).clamp_min(1e-300), torch.zeros_like(dots))
    return float(cos.mean())
