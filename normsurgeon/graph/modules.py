"""Small helpers on module trees: qualified-name access, short descriptions, type predicates."""
from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.PReLU,
    nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Softplus,
)
ACTIVATION_FUNCTIONS = {
    torch.relu: nn.ReLU, torch.nn.functional.relu: nn.ReLU, torch.nn.functional.relu6: nn.ReLU6,
    torch.nn.functional.silu: nn.SiLU, torch.nn.functional.gelu: nn.GELU,
    torch.nn.functional.hardswish: nn.Hardswish, torch.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh,
    torch.nn.functional.leaky_relu: nn.LeakyReLU, torch.nn.functional.mish: nn.Mish,
    torch.relu_: nn.ReLU,
}
ACTIVATION_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm)


def set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def describe(m: nn.Module | None) -> str:
    """``GroupNorm(32, 64)``-style one-liner."""
    if m is None:
        return "-"
    extra = m.extra_repr().split(", ")
    head = ", ".join(extra[:2]) if extra and extra[0] else ""
    return f"{type(m).__name__}({head})"


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def check_patterns_used(patterns, names, flag: str) -> None:
    """Raise PatternError for the first pattern that matches none of ``names`` (layer names)."""
    from normsurgeon.errors import PatternError

    names = [n for n in names if n]
    for p in patterns or ():
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            example = next((n for n in names if "." in n), names[0] if names else "layer1.0.bn1")
            raise PatternError(f"{flag} pattern {p!r} matches no layer of the model; names look like {example!r} "
                               "(normsurgeon inspect lists them; patterns are shell-style globs)")


def param_like(m: nn.Module) -> torch.Tensor | None:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t
    return None
