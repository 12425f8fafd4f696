"""The core recipes: gn, ln, in, gn+ws, frozen."""
from __future__ import annotations

from normsurgeon.recipes.groups import choose_groups, spatial_size
from normsurgeon.recipes.registry import WS_OPTIONS, BuildContext, LayerSpec, RecipeEntry, Replacement, register

WS_LAYERS = tuple(LayerSpec(f"normsurgeon.layers.ws_conv:WSConv{d}d", norm=False) for d in (1, 2, 3))


def positive_int(value: int) -> str | None:
    return None if value >= 1 else "must be a positive integer"


def like_bn(module, bn):
    """``module`` moved to the BN's device and dtype (read from its stats or affine, if it has any)."""
    ref = bn.running_mean if bn.running_mean is not None else (bn.weight if bn.affine else None)
    return module.to(device=ref.device, dtype=ref.dtype) if ref is not None else module


def copy_affine(dst, bn) -> None:
    """Copy BN's gamma/beta into ``dst.weight``/``dst.bias`` (nothing when BN has no affine)."""
    import torch

    if bn.affine:
        with torch.no_grad():
            dst.weight.copy_(bn.weight.detach())
            dst.bias.copy_(bn.bias.detach())


def group_norm_from_bn(ctx: BuildContext, wanted_groups: int, affine_from_bn: bool = True):
    """A GroupNorm with ``wanted_groups`` (adjusted and noted) carrying the BN's gamma/beta and eps."""
    from torch import nn

    bn = ctx.bn
    c = bn.num_features
    groups, note = choose_groups(c, wanted_groups, spatial_size(ctx.input_shape))
    if note:
        ctx.notes.append(note)
    gn = like_bn(nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine or not affine_from_bn), bn)
    if bn.affine and affine_from_bn:
        copy_affine(gn, bn)
        gn.weight.requires_grad_(bn.weight.requires_grad)  # a frozen BN stays frozen
        gn.bias.requires_grad_(bn.bias.requires_grad)
    if not bn.affine:
        ctx.notes.append("BN had no affine; GroupNorm has none either")
    return gn


def _gn(ctx: BuildContext) -> Replacement:
    return Replacement(norm=group_norm_from_bn(ctx, ctx.recipe.arg))


def _ln(ctx: BuildContext) -> Replacement:
    return Replacement(norm=group_norm_from_bn(ctx, 1))


def _in(ctx: BuildContext) -> Replacement:
    return Replacement(norm=group_norm_from_bn(ctx, ctx.bn.num_features))


def ws_producer(ctx: BuildContext):
    """The producing conv as a weight-standardized conv, or None (with a note saying why)."""
    from normsurgeon.layers.ws_conv import ws_class_for

    if ctx.producer is None:
        ctx.notes.append("no WS: the BN input is not produced by a conv module")
        return None
    cls = ws_class_for(ctx.producer)
    if cls is None:
        ctx.notes.append(f"no WS: producer is {type(ctx.producer).__name__}, not a plain conv")
        return None
    if ctx.producer.weight[0].numel() < 2:  # depthwise 1x1 (timm MobileOne's scale branch): fan-in 1
        ctx.notes.append("no WS: the producing conv has one weight per filter (fan-in 1), which standardizing "
                         "would turn into 0 (or NaN)")
        return None
    eps = ctx.recipe.option("ws_eps", 1e-5)
    form = ctx.recipe.option("ws_form", "var")
    return cls.from_conv(ctx.producer, eps=eps, form=form)


def _gn_ws(ctx: BuildContext) -> Replacement:
    return Replacement(norm=group_norm_from_bn(ctx, ctx.recipe.arg), producer=ws_producer(ctx))


def _frozen(ctx: BuildContext) -> Replacement:
    from normsurgeon.layers.frozen_bn import FrozenBatchNorm

    if ctx.bn.running_mean is None:
        raise ValueError("BN has no running statistics (track_running_stats=False): nothing to freeze")
    return Replacement(norm=FrozenBatchNorm.from_batchnorm(ctx.bn))


register(RecipeEntry(
    "gn", "GroupNorm(G) carrying BN's gamma/beta; G reduced to a usable divisor of C",
    _gn, arg_name="groups", arg_type=int, default=32, check_arg=positive_int, folds="no"))
register(RecipeEntry(
    "ln", "LayerNorm over channels and positions (GroupNorm with 1 group)", _ln, folds="no"))
register(RecipeEntry(
    "in", "InstanceNorm (GroupNorm with C groups; reduced where a group would hold < 4 values)",
    _in, folds="no"))
register(RecipeEntry(
    "gn+ws", "GroupNorm(G) + weight standardization of the producing conv (Qiao et al.)",
    _gn_ws, arg_name="groups", arg_type=int, default=32, check_arg=positive_int, folds="partial",
    options=WS_OPTIONS, layers=WS_LAYERS))
register(RecipeEntry(
    "frozen", "BN's eval-mode affine with fixed buffers: exactly function-preserving",
    _frozen, folds="yes", layers=(LayerSpec("normsurgeon.layers.frozen_bn:FrozenBatchNorm"),)))
