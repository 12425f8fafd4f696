"""Tracing a model with torch.fx, keeping normalization layers as leaves, and saying what blocks it.

Symbolic tracing fails on many zoo models (pytorch#87777, timm#1411/#1176: data-dependent control
flow, asserts on shapes). ``try_trace`` never raises for that: it returns the failure so the caller
can take the module-swap path and report which path ran.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn


def norm_leaf_types() -> tuple[type, ...]:
    """Module types kept whole during tracing: norms (BN subclasses too), convs, linears, normsurgeon's
    layers, and the layers registered recipes declare as leaves."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    from torch.nn.modules.conv import _ConvNd

    import normsurgeon.layers as L
    from normsurgeon.recipes.registry import layer_classes

    extra = tuple(
        t for t in (getattr(L, name) for name in getattr(L, "__all__", ()))
        if isinstance(t, type) and t is not L.NormAct  # NormAct is traced through: fold sees its parts
    ) + layer_classes(leaf=True)  # every registered recipe's layers, a recipe added at run time too
    # conv/linear subclasses (timm's StdConv2d, ScaledStdConv2d) stay whole so fold can see them
    return (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, _ConvNd, nn.Linear) + extra


class NormTracer(fx.Tracer):
    """An fx tracer that treats normalization layers (incl. third-party BN subclasses) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, norm_leaf_types()):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass
class TraceResult:
    graph_module: fx.GraphModule | None
    error: str | None  # first line of what blocked tracing

    @property
    def ok(self) -> bool:
        return self.graph_module is not None


def try_trace(model: nn.Module, x=None) -> TraceResult:
    """Symbolically trace ``model`` (norm layers as leaves). Never raises on tracing failures.

    A GraphModule is traced again too: containers that earlier passes put in (NormAct, BCN's
    Sequential) then show up as their parts. Arguments the probe ``x`` supplies (example inputs such
    as ``mask=``) stay inputs of the graph, even when they have a default."""
    tracer = NormTracer()
    concrete = concrete_defaults(model)
    from normsurgeon.graph.inputs import supplied_names

    for name in supplied_names(model, x):
        concrete.pop(name, None)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any failure here means "not traceable", reported
        return TraceResult(None, _describe(e))
    _drop_specialization_checks(graph)
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    from normsurgeon import provenance

    p = getattr(model, provenance.ATTR, None)
    if p is not None:
        setattr(gm, provenance.ATTR, p)
    return TraceResult(gm, None)


def concrete_defaults(model: nn.Module) -> dict:
    """The root forward's keyword defaults that are not tensors (``embed=False``, ``mask=None``,
    ``mode="cls"``): every verb calls ``model(x)``, so they are constants, bound for tracing (a branch on
    them would otherwise stop torch.fx). The first parameter (the input) and ``*args``/``**kwargs`` are not."""
    import inspect

    import torch

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if p.default is None or isinstance(p.default, (bool, int, float, str)):
            out[p.name] = p.default
        elif not isinstance(p.default, torch.Tensor) and isinstance(p.default, (tuple, list)) \
                and all(isinstance(v, (bool, int, float, str)) for v in p.default):
            out[p.name] = p.default
    return out


_CHECKS = ("_assert", "_assert_is_none", "eq")


def _drop_specialization_checks(graph: fx.Graph) -> None:
    """A bound keyword becomes a placeholder checked by ``torch._assert(embed == False)`` nodes, which
    ONNX exporters cannot take. Such a placeholder, when checks are all that use it, is removed with
    them: the rewritten model takes only the input (calling it with the keyword is then a TypeError,
    never a silently ignored argument)."""
    import operator

    import torch

    def is_check(n: fx.Node) -> bool:
        if n.op != "call_function":
            return False
        name = getattr(n.target, "__name__", "")
        return n.target in (torch._assert, operator.eq) or name in _CHECKS

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        dependents, todo = [], list(ph.users)
        while todo:
            u = todo.pop()
            if u not in dependents:
                dependents.append(u)
                todo.extend(u.users)
        if not dependents or not all(is_check(u) for u in dependents):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        for u in sorted(dependents, key=order.get, reverse=True):
            graph.erase_node(u)
        graph.erase_node(ph)


def _describe(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(e).__name__}: {msg}"[:300]


def node_label(node) -> str:
    """A short human label for what an fx node is: a module path, ``cat()``, ``.relu()``, the model input."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) + "()"
    if node.op == "call_method":
        return f".{node.target}()"
    return {"placeholder": "the model input", "output": "the model output"}.get(node.op, node.name)


def check_traced(gm: fx.GraphModule, reference, x, rtol: float = 1e-5) -> str | None:
    """Why the traced graph cannot stand in for the model on probe ``x`` (None: it can). ``reference``
    is the eager model's output on ``x``. torch.fx records one path through the code: a graph can fail
    at run time (MONAI's BasicUNet) or compute something else than eager (a branch on a traced value)."""
    import torch

    from normsurgeon.graph.inputs import call
    from normsurgeon.graph.verify import output_error

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            got = call(gm, x)
    except Exception as e:  # noqa: BLE001 - any failure means: take the module-swap path
        return f"the traced graph fails on the probe input ({_describe(e)})"
    finally:
        gm.train(was)
    rel = output_error(reference, got)[1]
    if not rel <= rtol:
        return f"the traced graph's output differs from the model's on the probe input (max rel error {rel:.1e})"
    return None
