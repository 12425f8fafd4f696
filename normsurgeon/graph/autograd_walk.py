"""The autograd graph of one forward, for passes that cannot use a torch.fx graph: which module's
output feeds which module's input, and who else consumes a tensor.

- :func:`record_calls` runs the model once with autograd on (floating inputs made to require grad)
  and records, for each watched module, the ``grad_fn`` of its input and output at its first call,
  their shapes, and how often it was called.
- :func:`users_of` reads that graph forward: for every node reachable from the outputs, the nodes
  that consume its result (one entry per use, so a node used twice by one op is listed twice).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normsurgeon.graph.inputs import call, map_input
from normsurgeon.graph.verify import flatten_outputs


@dataclass
class Call:
    module: nn.Module
    in_fn: Any  # grad_fn of the first tensor argument (None for a leaf input)
    out_fn: Any  # grad_fn of the output tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def in_rank(self) -> int:
        return len(self.in_shape)

    @property
    def out_rank(self) -> int:
        return len(self.out_shape)


def record_calls(model: nn.Module, x, watched: dict[str, nn.Module]) -> tuple[dict[str, Call], Counter, list]:
    """(first call of each watched module that took and returned tensors, in call order; calls per
    module; the output tensors' ``grad_fn``s). The model runs in the mode it is in."""
    records: dict[str, Call] = {}
    calls: Counter = Counter()
    names = {id(m): n for n, m in watched.items()}

    def hook(mod, args, out):
        name = names[id(mod)]
        calls[name] += 1
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if name not in records and t is not None and isinstance(out, torch.Tensor):
            records[name] = Call(mod, t.grad_fn, out.grad_fn, tuple(t.shape), tuple(out.shape))

    handles = [m.register_forward_hook(hook) for m in watched.values()]
    try:
        with torch.enable_grad():
            out = call(model, map_input(x, lambda t: t.detach().clone().requires_grad_(True) * 1.0))
    finally:
        for h in handles:
            h.remove()
    roots = [t.grad_fn for t in flatten_outputs(out) if t.grad_fn is not None]
    return records, calls, roots


def users_of(roots) -> dict[int, list]:
    """``{id(node): [consumer nodes]}`` over the graph reachable from ``roots`` (output ``grad_fn``s).
    Keyed by ``id``: hold a reference to the roots while the map is in use."""
    users: dict[int, list] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None:
                users.setdefault(id(nxt), []).append(node)
                stack.append(nxt)
    return users
