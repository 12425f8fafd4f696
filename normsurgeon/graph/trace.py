"""Tracing a model with torch.fx, keeping normalization layers as leaves, and saying what blocks it.

Symbolic tracing fails on many zoo models (pytorch#87777, timm#1411/#1176: data-dependent control
flow, asserts on shapes). ``try_trace`` never raises for that: it returns the failure so the caller
can take the module-swap path and report which path ran.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn


def norm_leaf_types() -> tuple[type, ...]:
    """Module types kept whole during tracing: norms (BN subclasses too), convs, linears, our layers."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    import normsurgeon.layers as L

    from torch.nn.modules.conv import _ConvNd

    extra = tuple(
        t for t in (getattr(L, name) for name in getattr(L, "__all__", ()))
        if isinstance(t, type) and t is not L.NormAct  # NormAct is traced through: fold sees its parts
    )
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


def try_trace(model: nn.Module) -> TraceResult:
    """Symbolically trace ``model`` (norm layers as leaves). Never raises on tracing failures.

    A GraphModule is traced again too: containers that earlier passes put in (NormAct, BCN's
    Sequential) then show up as their parts."""
    tracer = NormTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any failure here means "not traceable", reported
        return TraceResult(None, _describe(e))
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    from normsurgeon import provenance

    p = getattr(model, provenance.ATTR, None)
    if p is not None:
        setattr(gm, provenance.ATTR, p)
    return TraceResult(gm, None)


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

    from normsurgeon.graph.verify import output_error

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            got = gm(x)
    except Exception as e:  # noqa: BLE001 - any failure means: take the module-swap path
        return f"the traced graph fails on the probe input ({_describe(e)})"
    finally:
        gm.train(was)
    rel = output_error(reference, got)[1]
    if not rel <= rtol:
        return f"the traced graph's output differs from the model's on the probe input (max rel error {rel:.1e})"
    return None
