"""equalize's plan for models torch.fx cannot trace, or whose traced graph is not the model.

The same pairs as the graph path (a producer's channels reaching conv/linear consumers through
positively homogeneous ops only), read off the autograd graph of one probe forward instead: forward
hooks record each conv/linear/norm module's input and output ``grad_fn``; walking *forward* from a
producer's output node (the autograd graph reversed) must meet only homogeneous nodes (ReLU,
LeakyReLU, PReLU, max/avg pooling, a spatial mean, a clone, one flatten) before every path ends at
the input of a conv or linear module. Any other node -- a residual add, a concat, a non-homogeneous
activation, the model output -- ties the channels and the producer is skipped, with the reason.

Conservative by construction: an autograd node type not listed below blocks the pair.
"""
from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.conv import _ConvNd

from normsurgeon.graph.autograd_walk import Call, record_calls, users_of
from normsurgeon.passes.equalize import _WEIGHT_TYPES, Consumer, Pair, Plan, _channels, _producer_kind
from normsurgeon.report import Change

# autograd node types through which a positive per-channel scale passes unchanged
_PASS = {
    "ReluBackward0", "LeakyReluBackward0", "PreluKernelBackward0", "CloneBackward0",
    "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
    "AvgPool2DBackward0", "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
    "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
}
_RESHAPE = {"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"}
_MEAN = "MeanBackward1"
_TIES = {"AddBackward0": "reaches a residual add", "CatBackward0": "reaches a concat"}


def _mean_is_spatial(node) -> bool:
    sizes = tuple(node._saved_self_sym_sizes)
    dims = {d % len(sizes) for d in node._saved_dim}
    return len(sizes) > 2 and bool(dims) and min(dims) >= 2


def _follow(start, channels: int, batch: int, recs: dict[str, Call], calls, users, roots, by_in) -> tuple[list, str | None]:
    """(consumers as (name, block), None) or (.., why the channels are tied)."""
    consumers: list[tuple[str, int]] = []
    stack = [(start, 1)]
    seen: set[int] = set()
    while stack:
        node, block = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in roots:
            return consumers, "reaches the model output"
        for user in users.get(id(node), []):
            name = by_in.get((id(node), id(user)))
            kind = type(user).__name__
            if name is not None:
                rec = recs[name]
                if calls[name] != 1:
                    return consumers, f"consumer {name} is called {calls[name]} times"
                if isinstance(rec.module, _ConvNd) and block != 1:
                    return consumers, f"{name} reads a flattened tensor"
                if isinstance(rec.module, nn.Linear):
                    if len(rec.in_shape) != 2 or rec.in_shape != (batch, channels * block):
                        return consumers, f"{name} is a linear on a tensor it does not read channel-major"
                consumers.append((name, block))
            elif kind in _PASS:
                stack.append((user, block))
            elif kind == _MEAN and _mean_is_spatial(user):
                stack.append((user, block))
            elif kind in _RESHAPE:
                sizes = tuple(user._saved_self_sym_sizes)
                if block != 1 or len(sizes) < 2 or sizes[1] != channels:
                    return consumers, f"reshaped at {kind} in a way the channels do not survive"
                stack.append((user, math.prod(sizes[2:]) if len(sizes) > 2 else 1))
            else:
                if kind in _TIES:
                    return consumers, _TIES[kind]
                owner = next((n for n, r in recs.items() if r.out_fn is user), None)
                what = f"{type(recs[owner].module).__name__} {owner}" if owner else kind.removesuffix("Backward0")
                return consumers, f"feeds {what} (not positively homogeneous)"
    return consumers, None


def swap_plan(model: nn.Module, x) -> Plan:
    """The balanceable pairs of ``model`` (left unchanged; train/eval restored), from its autograd graph."""
    watched = {n: m for n, m in model.named_modules() if _producer_kind(m) is not None or type(m) in _WEIGHT_TYPES}
    was = model.training
    try:
        model.eval()
        recs, calls, roots = record_calls(model, x, watched)
    finally:
        model.train(was)
    users, root_ids = users_of(roots), {id(r) for r in roots}
    # (node feeding a conv/linear, that module's own output node) -> the module: a module's input edge
    by_in = {(id(r.in_fn), id(r.out_fn)): n for n, r in recs.items()
             if type(r.module) in _WEIGHT_TYPES and r.in_fn is not None and r.out_fn is not None}
    pairs, skipped = [], []
    for name in list(recs) + [n for n in watched if n not in recs]:  # call order, then never-called ones
        m = watched[name]
        kind = _producer_kind(m)
        if kind is None:
            continue
        rec = recs.get(name)
        if rec is None or rec.out_fn is None:
            skipped.append(Change(name, "skipped", type(m).__name__, "", "not called on the probe input"))
            continue
        if calls[name] != 1:
            skipped.append(Change(name, "skipped", type(m).__name__, "", f"called {calls[name]} times (shared module)"))
            continue
        if isinstance(m, nn.Linear) and len(rec.out_shape) != 2:
            skipped.append(Change(name, "skipped", type(m).__name__, "", "linear output of rank != 2"))
            continue
        channels = _channels(m)
        found, reason = _follow(rec.out_fn, channels, rec.out_shape[0], recs, calls, users, root_ids, by_in)
        if reason is None and not found:
            reason = "no conv/linear consumes its output"
        if reason is not None:
            skipped.append(Change(name, "skipped", type(m).__name__, "", f"channels tied: {reason}"))
            continue
        pairs.append(Pair(name, kind, channels, [Consumer(n, b) for n, b in dict.fromkeys(found)]))
    return Plan(pairs, skipped)
