"""Optimizer parameter groups and regularizers for the seed methods."""
from __future__ import annotations

import torch
from torch import nn

REVISITED_LR_DIVISOR = 100.0  # revisiting-bn weight_decay_and_learning_rate.py: c = 100


def _is_proxy(module: nn.Module) -> bool:
    from normsurgeon.layers.proxy_norm import ProxyNorm

    return isinstance(module, ProxyNorm)


def revisited_param_groups(model: nn.Module, lr: float, weight_decay: float,
                           lr_divisor: float = REVISITED_LR_DIVISOR) -> list[dict]:
    """"Revisiting BN" update rule (Davis & Frank; osu-cvl/revisiting-bn): a parameter that is 1-D
    after squeeze **and** named ``weight`` (norm scales, incl. the input-norm gamma) trains at
    ``lr / lr_divisor`` with no weight decay; any other 1-D parameter (shifts, biases) gets no weight
    decay; everything else keeps ``weight_decay``. Groups carry their own ``lr``, so a scheduler that
    scales each group's lr keeps the ratio."""
    scales, flat, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.squeeze().dim() <= 1:
            (scales if "weight" in name.rsplit(".", 1)[-1] else flat).append(p)
        else:
            rest.append(p)
    groups = [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": scales, "lr": lr / lr_divisor, "weight_decay": 0.0},
        {"params": flat, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def proxy_norm_param_groups(model: nn.Module, weight_decay: float, proxy_weight_decay: float) -> list[dict]:
    """Proxy norm (Graphcore proxy_norm.py): gamma, beta of the norms under PN and PN's beta~/gamma~
    are excluded from the normal weight decay; beta~/gamma~ get ``proxy_weight_decay``."""
    proxy, affine_ids = [], set()
    for m in model.modules():
        if _is_proxy(m):
            proxy += [m.proxy_shift, m.proxy_scale]
            src = m.affine_source
            affine_ids |= {id(t) for t in (getattr(src, "weight", None), getattr(src, "bias", None)) if t is not None}
    proxy_ids = {id(p) for p in proxy}
    no_decay, rest = [], []
    for p in model.parameters():
        if id(p) in proxy_ids:
            continue
        (no_decay if id(p) in affine_ids else rest).append(p)
    groups = [
        {"params": rest, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": proxy, "weight_decay": proxy_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def gamma_decay_penalty(model: nn.Module, coeff: float) -> torch.Tensor:
    """``coeff * (1/2 sum (gamma - 1)^2 + 1/2 sum beta^2)`` over normalization layers' affines: the
    "decay gamma toward 1" regularizer of Summers & Dinneen (four_things_batch_norm
    ``get_bn_regularizers``, TF l2_loss = half the sum of squares; never wired in the reference).
    Add it to the loss."""
    from normsurgeon.passes.train_options import _norm_with_scale

    total = None
    for m in model.modules():
        if not _norm_with_scale(m) or not isinstance(m.weight, nn.Parameter):
            continue
        term = 0.5 * (m.weight - 1).pow(2).sum()
        if isinstance(getattr(m, "bias", None), nn.Parameter):
            term = term + 0.5 * m.bias.pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return coeff * total
