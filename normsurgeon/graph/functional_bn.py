"""Reading ``F.batch_norm(...)`` calls in a traced graph (pytorch#122070: functional BN is otherwise
invisible to module-level passes)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

_BN_SIG = inspect.signature(torch.nn.functional.batch_norm)
COMPUTED = "functional batch_norm whose tensors are computed, not stored"


@dataclass
class FunctionalBN:
    input: Any  # the fx node normalized
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: Any
    momentum: Any
    eps: float


def is_functional_bn(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.nn.functional.batch_norm


def read_functional_bn(gm: fx.GraphModule, node: fx.Node) -> tuple[FunctionalBN | None, str | None]:
    """The call's arguments with stored tensors fetched: ``(info, None)``; ``(None, reason)`` when a
    statistic or affine is computed in the graph; ``(None, None)`` when the call does not bind."""
    try:
        bound = _BN_SIG.bind(*node.args, **node.kwargs)
    except TypeError:
        return None, None
    bound.apply_defaults()
    a = bound.arguments

    def fetch(arg):
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            obj = gm
            for part in arg.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise LookupError

    try:
        rm, rv, w, b = (fetch(a[k]) for k in ("running_mean", "running_var", "weight", "bias"))
    except (LookupError, AttributeError):
        return None, COMPUTED
    return FunctionalBN(a["input"], rm, rv, w, b, a["training"], a["momentum"], float(a["eps"])), None
