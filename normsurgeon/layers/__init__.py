"""Normalization layers, one concept a file. Parameter names follow torch (weight, bias, running_*).

Every class in ``__all__`` is kept whole (an fx leaf) by ``graph.trace.NormTracer``; containers such
as :class:`BatchChannelNorm` are deliberately left out so tracing goes through them.

Protocols
---------
**Fold** (``eval_affine``): a layer whose eval-mode function is a constant per-channel affine exposes
``eval_affine() -> (scale, shift)`` (1-D, length C), or returns None when, in its current
configuration, it is not one (example-weighted BN with alpha > 0, batch-group norm whose groups split
spatial positions).

A layer whose eval function is such an affine followed by something per-instance keeps that rest in
a child named ``act`` (the extras convention of ``norm_act.bn_extras``): ``eval_affine()`` is then the
affine part only, and fold leaves ``act`` in the layer's place (``InstanceEnhancedBatchNorm``).

**Recalibration** (layers keeping running estimates: ``EstimatedBatchNorm`` (BCN's batch part),
``BatchGroupNorm``, ``GeneralizedBatchNorm``/``GhostBatchNorm`` (ghost, bn+gn, ebn), ``InputNorm``,
``CrossIterationBatchNorm``, ``BatchKalmanNorm``, ``InstanceEnhancedBatchNorm``):

- ``reset_running_stats()``: back to the initial estimates.
- ``stat_view(x)``: x reshaped so that dim 1 indexes the layer's statistics (channels, or groups for
  batch-group norm); ``moment_axes(x)``: the axes of that view one statistic reduces over (all but 1).
- ``batch_moments(x) -> (sum_x, sum_x2, count)``: per-statistic sums over those axes for one batch,
  in float64, shaped like the running buffers; ``count`` is the number of values per statistic.
- ``load_moments(mean, sq_mean, count)``: set the running estimates from exact pooled moments
  E[x] = sum(sum_x) / sum(count) and E[x^2]. Layers storing mean/var set
  ``running_var = E[x^2] - E[x]^2`` (the population variance of the pooled data, no n/(n-1) factor);
  layers storing E[x^2] directly (the Four-Things layers) store it as is.

The recalibration pass accumulates ``batch_moments`` over its data (in eval mode for the rest of the
network) and calls ``load_moments`` once; plain torch BN gets the same treatment from that pass.
"""
from normsurgeon.layers.affine import ChannelAffine
from normsurgeon.layers.batch_group_norm import BatchGroupNorm
from normsurgeon.layers.bcn import BatchChannelNorm, ChannelGroupNorm, EstimatedBatchNorm
from normsurgeon.layers.bkn import BatchKalmanNorm
from normsurgeon.layers.cbn import CrossIterationBatchNorm
from normsurgeon.layers.dain import DAIN
from normsurgeon.layers.example_bn import GeneralizedBatchNorm
from normsurgeon.layers.frozen_bn import FrozenBatchNorm
from normsurgeon.layers.ghost_bn import GhostBatchNorm
from normsurgeon.layers.iebn import IEBNGate, InstanceEnhancedBatchNorm
from normsurgeon.layers.input_norm import InputNorm
from normsurgeon.layers.moments import RunningMoments
from normsurgeon.layers.norm_act import NormAct
from normsurgeon.layers.proxy_norm import ProxyNorm
from normsurgeon.layers.ws_conv import WSConv1d, WSConv2d, WSConv3d, standardize_weight

__all__ = [
    "BatchGroupNorm", "ChannelAffine", "ChannelGroupNorm", "EstimatedBatchNorm", "FrozenBatchNorm",
    "GeneralizedBatchNorm", "GhostBatchNorm", "InputNorm", "NormAct", "ProxyNorm",
    "BatchKalmanNorm", "CrossIterationBatchNorm", "DAIN", "IEBNGate", "InstanceEnhancedBatchNorm",
    "WSConv1d", "WSConv2d", "WSConv3d", "standardize_weight",
]
# BatchChannelNorm (a Sequential of EstimatedBatchNorm + ChannelGroupNorm) and RunningMoments (a mixin)
# are importable from here but not in __all__: tracing must see BCN's two parts separately.
