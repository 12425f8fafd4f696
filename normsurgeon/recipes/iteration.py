"""Recipes for the micro-batch BN variants that keep batch statistics but stabilise them: cross-iteration
BN (``cbn``), Batch Kalman Normalization (``bkn``) and instance-enhancement BN (``iebn``). Formulas and
constants: the layer modules (normsurgeon/layers/cbn.py, bkn.py, iebn.py) and docs/recipes.md.

Options (``convert(..., **options)``): ``cbn_burnin`` (plain-BN iterations before pooling, default 100),
``bkn_gain`` (weight of the micro-batch in the Kalman update, default 0.5).
"""
from __future__ import annotations

from normsurgeon.recipes.basic import like_bn, positive_int
from normsurgeon.recipes.registry import (
    BuildContext, LayerSpec, RecipeEntry, RecipeOption, Replacement, nonnegative_int, register, unit_rate,
)


def _load_bn(layer, bn) -> None:
    """BN's gamma/beta and running statistics into ``layer`` (its weight/bias/running_mean/running_var)."""
    import torch

    with torch.no_grad():
        if bn.affine:
            layer.weight.copy_(bn.weight.detach())
            layer.bias.copy_(bn.bias.detach())
        if bn.running_mean is not None:
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)


def _momentum(bn) -> float:
    return bn.momentum if bn.momentum is not None else 0.1


def _cbn(ctx: BuildContext) -> Replacement:
    from normsurgeon.layers.cbn import CBN_BURNIN, CrossIterationBatchNorm

    bn = ctx.bn
    burnin = int(ctx.recipe.option("cbn_burnin", CBN_BURNIN))
    layer = CrossIterationBatchNorm(bn.num_features, window=ctx.recipe.arg, burnin=burnin, eps=bn.eps,
                                    momentum=_momentum(bn))
    _load_bn(layer, bn)
    layer = like_bn(layer, bn)
    producer = ctx.producer
    weight = getattr(producer, "weight", None)
    if isinstance(weight, type(layer.weight)) and weight.dim() >= 2 and weight.shape[0] == bn.num_features:
        layer.attach(producer)
        ctx.notes.append(f"window {ctx.recipe.arg}, burn-in {burnin}; compensated through {ctx.producer_name}")
    else:
        ctx.notes.append(f"window {ctx.recipe.arg}, burn-in {burnin}; no producing conv/linear: "
                         "past statistics pooled without compensation")
    return Replacement(norm=layer)


def _bkn(ctx: BuildContext) -> Replacement:
    from normsurgeon.layers.bkn import BKN_GAIN, BatchKalmanNorm

    bn = ctx.bn
    prev = getattr(ctx.producer, "in_channels", None) or getattr(ctx.producer, "in_features", None)
    gain = float(ctx.recipe.option("bkn_gain", BKN_GAIN))
    layer = BatchKalmanNorm(bn.num_features, prev_features=prev, gain=gain, eps=bn.eps, momentum=_momentum(bn))
    _load_bn(layer, bn)
    if prev:
        ctx.notes.append(f"gain {gain:g}; transition from a preceding {prev}-channel estimate")
    else:
        ctx.notes.append(f"gain {gain:g}; no producing conv/linear: prior from its own running estimates")
    return Replacement(norm=like_bn(layer, bn))


def _iebn(ctx: BuildContext) -> Replacement:
    from normsurgeon.layers.iebn import InstanceEnhancedBatchNorm

    bn = ctx.bn
    import torch

    layer = InstanceEnhancedBatchNorm(bn.num_features, eps=bn.eps, momentum=_momentum(bn))
    _load_bn(layer, bn)
    with torch.no_grad():  # w = 0: the gate is the constant sigmoid(b); gamma / sigmoid(b) keeps BN's function
        layer.weight.div_(torch.sigmoid(layer.act.gate_bias))
    ctx.notes.append("gate w=0, b=-1 (constant 0.27 at start); gamma divided by 0.27: same function as the BN")
    return Replacement(norm=like_bn(layer, bn))


register(RecipeEntry(
    "cbn", "Cross-Iteration BN: statistics pooled over the last K iterations (default 8), Taylor-compensated "
    "for the producing conv's weight change (Yao et al.)",
    _cbn, arg_name="window", arg_type=int, default=8, check_arg=positive_int,
    batch_independent_train=False, folds="yes",
    options=(RecipeOption("cbn_burnin", "iterations before statistics are pooled across iterations",
                          nonnegative_int),),
    layers=(LayerSpec("normsurgeon.layers.cbn:CrossIterationBatchNorm"),)))
register(RecipeEntry(
    "bkn", "Batch Kalman Norm: micro-batch statistics combined with a prior from the preceding layer (Wang et al.)",
    _bkn, batch_independent_train=False, folds="yes",
    options=(RecipeOption("bkn_gain", "weight of the batch statistics against the prior", unit_rate),),
    layers=(LayerSpec("normsurgeon.layers.bkn:BatchKalmanNorm"),)))
register(RecipeEntry(
    "iebn", "Instance-Enhancement BN: BN scale gated per instance by sigmoid(w GAP(x) + b) (Liang et al.); "
    "fold keeps the gate",
    _iebn, batch_independent_train=False, folds="partial",
    layers=(LayerSpec("normsurgeon.layers.iebn:InstanceEnhancedBatchNorm"),
            LayerSpec("normsurgeon.layers.iebn:IEBNGate", norm=False))))
