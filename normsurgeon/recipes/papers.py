"""Recipes for the methods of the project's sources: proxy norm, BCN, batch-group norm, ghost BN,
batch+group norm and example-weighted BN. Formulas and constants: the layer modules and docs/recipes.md.

Options (``convert(..., **options)``): ``pn_norm_eps`` (eps of the LN/GN under proxy norm, default
1e-3 as in Graphcore's EfficientNet code), ``pn_eps`` (0.03), ``bcn_estimate`` (True: the EstBN
micro-batch path), ``bcn_rate`` (0.1).
"""
from __future__ import annotations

from normsurgeon.recipes.basic import WS_LAYERS, copy_affine, group_norm_from_bn, like_bn, positive_int, ws_producer
from normsurgeon.recipes.groups import choose_groups, spatial_size
from normsurgeon.recipes.registry import (
    BCN_OPTIONS, PN_OPTIONS, WS_OPTIONS, BuildContext, LayerSpec, RecipeEntry, Replacement, register,
)

PN_LAYERS = (LayerSpec("normsurgeon.layers.proxy_norm:ProxyNorm", norm=False),)
GENERALIZED = (LayerSpec("normsurgeon.layers.example_bn:GeneralizedBatchNorm"),)

PN_NORM_EPS = 1e-3  # Graphcore EfficientNet --norm-epsilon default
PN_GROUPS = 4  # Graphcore --groups default (4 groups)
BGN_GROUPS = 32  # no verified default in the paper; a normsurgeon choice (GN's usual 32), reported
EBN_ALPHA = 0.5  # no verified default (the reference's 0 is plain BN); tune on held-out data


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "alpha must lie in [0, 1]"


def _bn_stats(bn):
    """BN's running (mean, var), or (0, 1) when it tracks none."""
    import torch

    if bn.running_mean is None:
        return torch.zeros(bn.num_features), torch.ones(bn.num_features)
    return bn.running_mean.detach(), bn.running_var.detach()


# ------------------------------------------------------------------------------------ proxy norm

def _proxy(ctx: BuildContext, groups: int, ws: bool) -> Replacement:
    from normsurgeon.layers.proxy_norm import PN_EPS, ProxyNorm

    norm = group_norm_from_bn(ctx, groups, affine_from_bn=False)  # always affine: holds gamma, beta
    norm.eps = float(ctx.recipe.option("pn_norm_eps", PN_NORM_EPS))
    pn_eps = float(ctx.recipe.option("pn_eps", PN_EPS))

    def after_activation(act):
        if act is None:
            # last norm of a residual branch: scale but no shift, and no PN (Graphcore MBConv projection)
            norm.bias = None
            return None
        return ProxyNorm(norm, act, norm.num_channels, eps=pn_eps)

    ctx.notes.append("proxy norm after the activation; scale-only norm and no PN where none follows")
    return Replacement(norm=norm, producer=ws_producer(ctx) if ws else None, after_activation=after_activation)


def _ln_pn(ctx: BuildContext) -> Replacement:
    return _proxy(ctx, 1, ws=False)


def _gn_pn(ctx: BuildContext) -> Replacement:
    return _proxy(ctx, ctx.recipe.arg, ws=False)


def _gn_ws_pn(ctx: BuildContext) -> Replacement:
    return _proxy(ctx, ctx.recipe.arg, ws=True)


# ------------------------------------------------------------------------------------------- BCN

def _bcn(ctx: BuildContext) -> Replacement:
    import torch

    from normsurgeon.layers.bcn import BatchChannelNorm, ChannelGroupNorm, EstimatedBatchNorm

    bn, c = ctx.bn, ctx.bn.num_features
    groups, note = choose_groups(c, ctx.recipe.arg, spatial_size(ctx.input_shape))
    if note:
        ctx.notes.append(note)
    estimate = bool(ctx.recipe.option("bcn_estimate", True))
    rate = float(ctx.recipe.option("bcn_rate", 0.1))
    part = EstimatedBatchNorm(c, eps=bn.eps, estimate=estimate, rate=rate,
                              momentum=bn.momentum if bn.momentum is not None else 0.1)
    copy_affine(part, bn)
    mean, var = _bn_stats(bn)
    with torch.no_grad():
        part.running_mean.copy_(mean)
        part.running_var.copy_(var)
    ctx.notes.append("EstBN running-estimate path, rate %g" % rate if estimate else "batch statistics in training")
    return Replacement(norm=like_bn(BatchChannelNorm(part, ChannelGroupNorm(groups, c)), bn))


# ------------------------------------------------------------------------------- batch-group norm

def _bgn(ctx: BuildContext) -> Replacement:
    import torch

    from normsurgeon.layers.batch_group_norm import BatchGroupNorm

    bn, c = ctx.bn, ctx.bn.num_features
    groups, note = choose_groups(c, ctx.recipe.arg, None)
    ctx.notes.append(note or f"{groups} groups")
    layer = BatchGroupNorm(c, groups, eps=bn.eps, momentum=bn.momentum if bn.momentum is not None else 0.1)
    copy_affine(layer, bn)
    mean, var = _bn_stats(bn)
    k = c // groups
    with torch.no_grad():  # pooled statistics of each group's channels (equal counts per channel)
        m = mean.double().reshape(groups, k)
        sq = (var.double() + mean.double() ** 2).reshape(groups, k)
        layer.running_mean.copy_(m.mean(1))
        layer.running_var.copy_(sq.mean(1) - m.mean(1) ** 2)
    return Replacement(norm=like_bn(layer, bn))


# ------------------------------------------------------------------------- Four Things layers

def _generalized(ctx: BuildContext, examples_per_group, channels_per_group: int, alpha: float, cls=None):
    import torch

    from normsurgeon.layers.example_bn import GeneralizedBatchNorm

    bn = ctx.bn
    if cls is None:
        layer = GeneralizedBatchNorm(bn.num_features, examples_per_group, channels_per_group, alpha, eps=bn.eps)
    else:
        layer = cls(bn.num_features, examples_per_group, eps=bn.eps)
    copy_affine(layer, bn)
    mean, var = _bn_stats(bn)
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_sq_mean.copy_(var + mean * mean)
    return Replacement(norm=like_bn(layer, bn))


def _ghost(ctx: BuildContext) -> Replacement:
    from normsurgeon.layers.ghost_bn import GhostBatchNorm

    ctx.notes.append(f"virtual batch {ctx.recipe.arg}")
    return _generalized(ctx, ctx.recipe.arg, 1, 0.0, cls=GhostBatchNorm)


def _bn_gn(ctx: BuildContext) -> Replacement:
    c = ctx.bn.num_features
    groups, note = choose_groups(c, 32, spatial_size(ctx.input_shape))
    if note:
        ctx.notes.append(note)
    ctx.notes.append(f"{groups} channel groups x 2 examples")
    return _generalized(ctx, 2, c // groups, 0.0)


def _ebn(ctx: BuildContext) -> Replacement:
    ctx.notes.append(f"inference example weight alpha={ctx.recipe.arg:g}")
    return _generalized(ctx, None, 1, float(ctx.recipe.arg))


register(RecipeEntry(
    "ln+pn", "LayerNorm + proxy normalization after the activation (Labatie et al.)",
    _ln_pn, folds="partial", options=PN_OPTIONS, layers=PN_LAYERS))
register(RecipeEntry(
    "gn+pn", "GroupNorm(G, default 4) + proxy normalization after the activation",
    _gn_pn, arg_name="groups", arg_type=int, default=PN_GROUPS, check_arg=positive_int, folds="partial",
    options=PN_OPTIONS, layers=PN_LAYERS))
register(RecipeEntry(
    "gn+ws+pn", "GroupNorm(G, default 4) + weight standardization + proxy normalization",
    _gn_ws_pn, arg_name="groups", arg_type=int, default=PN_GROUPS, check_arg=positive_int, folds="partial",
    options=WS_OPTIONS + PN_OPTIONS, layers=WS_LAYERS + PN_LAYERS))
register(RecipeEntry(
    "bcn", "Batch-Channel Norm: BN (running-estimate EstBN path) then 32-group channel norm (Qiao et al.)",
    _bcn, arg_name="groups", arg_type=int, default=32, check_arg=positive_int,
    batch_independent_train=False, folds="partial", options=BCN_OPTIONS,
    layers=(LayerSpec("normsurgeon.layers.bcn:EstimatedBatchNorm"), LayerSpec("normsurgeon.layers.bcn:ChannelGroupNorm"),
            LayerSpec("normsurgeon.layers.bcn:BatchChannelNorm", norm=False, leaf=False))))
register(RecipeEntry(
    "bgn", "Batch Group Norm: batch statistics over G channel groups (Zhou et al.; G default 32, unverified)",
    _bgn, arg_name="groups", arg_type=int, default=BGN_GROUPS, check_arg=positive_int,
    batch_independent_train=False, folds="yes", layers=(LayerSpec("normsurgeon.layers.batch_group_norm:BatchGroupNorm"),)))
register(RecipeEntry(
    "ghost", "Ghost BN: training statistics over virtual batches of B samples (default 16)",
    _ghost, arg_name="batch", arg_type=int, default=16, check_arg=positive_int,
    batch_independent_train=False, folds="yes", layers=(LayerSpec("normsurgeon.layers.ghost_bn:GhostBatchNorm"),)))
register(RecipeEntry(
    "bn+gn", "Batch+Group norm: statistics over 32 channel groups x pairs of samples (Summers & Dinneen)",
    _bn_gn, batch_independent_train=False, folds="yes", layers=GENERALIZED))
register(RecipeEntry(
    "ebn", "BN with inference example weighting alpha (default 0.5; Summers & Dinneen); alpha>0 not foldable",
    _ebn, arg_name="alpha", arg_type=float, default=EBN_ALPHA, check_arg=_unit_interval,
    batch_independent_train=False, folds="no", layers=GENERALIZED))
