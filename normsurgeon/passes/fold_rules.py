"""Fold rules: which modules are a constant per-channel affine at eval, and which convs hide a
constant weight transform. ``fold`` is these rules plus the graph plumbing in ``fold.py``.

Adding a layer type is one more entry in ``AFFINE_RULES`` or ``WS_RULES``. Any module exposing
``eval_affine() -> (scale, shift) | None`` (normsurgeon.layers.affine protocol) is covered by the
first affine rule without a new entry.

Affine rules return ``(scale, shift)`` in float64 (``y = scale * x + shift`` over dim 1), or a string
saying why the module is not a constant affine. docs/recipes.md says what each recipe leaves foldable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normsurgeon.layers.norm_act import bn_extras

Affine = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AffineRule:
    name: str
    applies: Callable[[nn.Module], bool]
    extract: Callable[[nn.Module], "Affine | str"]


def _protocol(m: nn.Module) -> "Affine | str":
    with torch.no_grad():
        out = m.eval_affine()
    if out is None:
        return f"{type(m).__name__}.eval_affine() is None: not a constant affine in this configuration"
    scale, shift = out
    return scale.detach().double().flatten(), shift.detach().double().flatten()


def _bn_affine(weight, bias, mean, var, eps: float, channels: int) -> Affine:
    """BN eval: ``gamma * (x - mean) / sqrt(var + eps) + beta`` (Ioffe & Szegedy 2015)."""
    dev = mean.device
    w = weight.detach().double() if weight is not None else torch.ones(channels, dtype=torch.float64, device=dev)
    b = bias.detach().double() if bias is not None else torch.zeros(channels, dtype=torch.float64, device=dev)
    scale = w / torch.sqrt(var.detach().double() + eps)
    return scale, b - mean.detach().double() * scale


def _batchnorm(m: _BatchNorm) -> "Affine | str":
    if m.running_mean is None or m.running_var is None:
        return "no running statistics (track_running_stats=False): normalizes with batch statistics at eval"
    return _bn_affine(m.weight, m.bias, m.running_mean, m.running_var, m.eps, m.num_features)


def frozen_bn_types() -> tuple[type, ...]:
    """Frozen BN classes without a ``_BatchNorm`` base: torchvision's FrozenBatchNorm2d, and timm's
    FrozenBatchNorm2d / FrozenBatchNormAct2d when timm is loaded (a timm model in memory means it is)."""
    import sys

    from torchvision.ops.misc import FrozenBatchNorm2d

    types: list[type] = [FrozenBatchNorm2d]
    if "timm" in sys.modules:
        import timm.layers as tl

        types += [t for t in (getattr(tl, n, None) for n in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"))
                  if isinstance(t, type)]
    return tuple(types)


def _is_frozen_bn(m: nn.Module) -> bool:
    """By class (isinstance), never by name: a container called ``FooNorm`` is not a norm layer."""
    return isinstance(m, frozen_bn_types()) and all(
        isinstance(getattr(m, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var")
    )


def _frozen_bn(m: nn.Module) -> Affine:
    return _bn_affine(m.weight, m.bias, m.running_mean, m.running_var, float(m.eps), m.running_mean.numel())


AFFINE_RULES: list[AffineRule] = [
    # the protocol first: a BN subclass that knows its own eval affine (ghost BN, ...) is trusted
    AffineRule("eval_affine protocol", lambda m: callable(getattr(m, "eval_affine", None)), _protocol),
    AffineRule("batchnorm", lambda m: isinstance(m, _BatchNorm), _batchnorm),
    AffineRule("frozen batchnorm", _is_frozen_bn, _frozen_bn),
]


def affine_rule(m: nn.Module) -> AffineRule | None:
    for rule in AFFINE_RULES:
        if rule.applies(m):
            return rule
    return None


def extras(m: nn.Module) -> nn.Module | None:
    """What the layer applies after its affine (timm BatchNormAct2d: drop then act), as one module."""
    drop, act = bn_extras(m)
    parts = [p for p in (drop, act) if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def per_sample_norm_types() -> tuple[type, ...]:
    """Norm layers that normalize with each input's own statistics (never a constant affine): torch's
    GroupNorm, LayerNorm, InstanceNorm, RMSNorm, LocalResponseNorm and timm's RMS/LayerNorm variants
    that do not subclass them (when timm is loaded)."""
    import sys

    from torch.nn.modules.instancenorm import _InstanceNorm

    types: list[type] = [nn.GroupNorm, nn.LayerNorm, _InstanceNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    if "timm" in sys.modules:
        import timm.layers as tl

        types += [t for t in (getattr(tl, n, None) for n in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d",
                                                              "LayerNorm2d", "LayerNormExp2d", "GroupNorm1"))
                  if isinstance(t, type)]
    return tuple(types)


def not_foldable_reason(m: nn.Module) -> str | None:
    """Why a norm layer that no rule covers stays (for the report), or None if it is not a norm.
    Decided by class (isinstance), never by the class name."""
    if isinstance(m, per_sample_norm_types()):
        return f"{type(m).__name__} normalizes with each input's own statistics: not a constant affine"
    return None


# ----------------------------------------------------------------------------- weight standardization
@dataclass(frozen=True)
class WSRule:
    name: str
    applies: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]  # the weight its forward computes, same dtype and ops
    describe: Callable[[nn.Module], str]


def _is_timm(m: nn.Module, *names: str) -> bool:
    return type(m).__module__.startswith("timm.") and type(m).__name__ in names


def _ns_ws_weight(m) -> torch.Tensor:
    from normsurgeon.layers.ws_conv import standardize_weight

    return standardize_weight(m.weight.detach(), m.ws_eps, m.ws_form)


def _timm_std_weight(m, gain: torch.Tensor | None = None) -> torch.Tensor:
    """timm StdConv2d: ``F.batch_norm(W.reshape(1, O, -1), training=True, eps)``, i.e. biased variance
    with eps inside the square root (timm/layers/std_conv.py). Computed with the very call the layer
    makes, so the stored weight is bit-identical to the one its forward computes."""
    w = m.weight.detach()
    out = torch.nn.functional.batch_norm(
        w.reshape(1, m.out_channels, -1), None, None, weight=gain, training=True, momentum=0.0, eps=m.eps)
    return out.reshape_as(w)


def _timm_scaled_std_weight(m) -> torch.Tensor:
    """timm ScaledStdConv2d (Brock et al. 2021, NF-Nets): standardized as StdConv2d, then times
    ``gain * gamma / sqrt(fan_in)`` per output filter (``m.scale`` holds gamma / sqrt(fan_in))."""
    return _timm_std_weight(m, (m.gain.detach() * m.scale).view(-1))


def _is_ns_ws(m: nn.Module) -> bool:
    from normsurgeon.layers.ws_conv import _WSMixin

    return isinstance(m, _WSMixin)


WS_RULES: list[WSRule] = [
    WSRule("normsurgeon WS conv", _is_ns_ws, _ns_ws_weight,
           lambda m: f"weight standardization precomputed ({m.ws_form} form, eps {m.ws_eps:g})"),
    WSRule("timm StdConv2d", lambda m: _is_timm(m, "StdConv2d", "StdConv2dSame"), _timm_std_weight,
           lambda m: f"weight standardization precomputed (biased var, eps {m.eps:g})"),
    WSRule("timm ScaledStdConv2d", lambda m: _is_timm(m, "ScaledStdConv2d", "ScaledStdConv2dSame"),
           _timm_scaled_std_weight,
           lambda m: f"scaled weight standardization precomputed (gain and 1/sqrt(fan-in), eps {m.eps:g})"),
]


def ws_rule(m: nn.Module) -> WSRule | None:
    for rule in WS_RULES:
        if rule.applies(m):
            return rule
    return None


_PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def plain_conv(m: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain conv computing what ``m`` computes, holding ``weight`` (timm's dynamic SAME padding is
    kept with timm's own Conv2dSame, which pads then runs a plain conv)."""
    dims = m.weight.dim() - 2
    cls = _PLAIN[dims]
    if getattr(m, "same_pad", False):
        from timm.layers import Conv2dSame

        cls = Conv2dSame
    kw = dict(stride=m.stride, dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
    if cls is _PLAIN[dims]:
        kw.update(padding=m.padding, padding_mode=m.padding_mode)
    new = cls(m.in_channels, m.out_channels, m.kernel_size, device="meta", **kw)
    new.weight = nn.Parameter(weight.to(device=m.weight.device, dtype=m.weight.dtype),
                              requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    return new
