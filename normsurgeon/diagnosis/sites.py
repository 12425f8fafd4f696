"""Which layers ``diagnose`` watches: every norm layer, and the activation applied to its output.

Norm layers are found by type (``isinstance``), never by class name: torch's ``_BatchNorm`` (and
its subclasses, timm's included), ``_InstanceNorm``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``,
``LocalResponseNorm``, normsurgeon's norm layers, and any module with the recalibration protocol
(:func:`normsurgeon.calibrate.protocol.has_protocol`). ``ProxyNorm`` is not a site of its own: it
normalizes an activation's output, so it belongs to the block of the norm before it.

The activation after a norm comes from the fx graph where the model traces (the norm's output has
one user, an elementwise activation module or function, reached through dropout/identity; a
``ProxyNorm`` right after it joins the block). Where fx cannot trace, the next module in
registration order is taken when it is an activation. Without either, the block output is the
norm's own output (e.g. a ResNet's last BN before the residual add).

The hook sits on the norm only: its forward hook applies the block (``Site.post``) to the norm's
output itself. A hook on the activation module would not do: torchvision's ResNet blocks call one
``ReLU`` module twice (after ``bn1`` and after the residual add), so its calls cannot be told apart.
Activations are elementwise and stateless, so applying them again gives the values the model
computes (in-place ones run on a copy).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normsurgeon.calibrate.protocol import has_protocol
from normsurgeon.errors import first_line
from normsurgeon.graph.trace import NormTracer

ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)
ACTIVATION_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, torch.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus,
}
ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}
PASS_THROUGH: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _norm_types() -> tuple[type, ...]:
    import normsurgeon.layers as L
    from normsurgeon.recipes.registry import layer_classes

    ours = layer_classes(norm=True) + (L.InputNorm,)
    torch_norms = [_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm]
    if hasattr(nn, "RMSNorm"):
        torch_norms.append(nn.RMSNorm)
    return tuple(torch_norms) + ours


def is_norm(m: nn.Module) -> bool:
    from normsurgeon.layers import ProxyNorm

    if isinstance(m, ProxyNorm):
        return False
    return isinstance(m, _norm_types()) or has_protocol(m)


@dataclass
class Site:
    """One norm layer: its module, the block after it (``post(y)`` = what leaves the block) and a label."""

    name: str
    module: nn.Module
    post: Callable[[torch.Tensor], torch.Tensor] | None
    activation: str  # e.g. "ReLU", "ReLU+ProxyNorm", "-" (none)
    token_width: int | None  # C for a norm over one trailing dim (LayerNorm(C), RMSNorm(C)), else None

    def channel_last(self, y: torch.Tensor) -> bool:
        """Whether ``y``'s channels are its last dim: a token-wise norm whose output has C last and not
        at dim 1 (torchvision's LayerNorm2d normalizes dim 1 of (N, C, H, W) through a permute); when
        both fit, a plain ``nn.LayerNorm``/``nn.RMSNorm`` means last."""
        c = self.token_width
        if c is None or y.dim() <= 2 or y.shape[-1] != c:
            return False
        return y.shape[1] != c or type(self.module) in _TOKEN_NORMS

    @property
    def kind(self) -> str:
        return type(self.module).__name__


_TOKEN_NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def token_width(m: nn.Module) -> int | None:
    """C for norms over one trailing dim (``normalized_shape == (C,)``), else None."""
    shape = getattr(m, "normalized_shape", None)
    return int(shape[0]) if isinstance(shape, (tuple, list)) and len(shape) == 1 else None


def find_sites(model: nn.Module) -> tuple[list[Site], str]:
    """Every norm layer of ``model`` with the block after it, and how the activations were found."""
    norms, seen = [], set()
    for name, m in model.named_modules():
        if id(m) not in seen and is_norm(m) and not _inside_norm(name, norms):
            seen.add(id(m))
            norms.append((name, m))
    names = {n for n, _ in norms}
    graph, error = _trace(model)
    order = _posts_from_order(model, names)
    if graph is not None:
        posts = _posts_from_graph(graph, model, names)
        how = "fx graph"
        missing = names - _called(graph)
        posts.update({n: order[n] for n in missing if n in order})  # shared or inlined: module order
    else:
        posts, how = order, f"module order (fx cannot trace: {error})"
    sites = []
    for name, m in norms:
        post, label = posts.get(name, (None, "-"))
        sites.append(Site(name, m, post, label, token_width(m)))
    return sites, how


class _SiteTracer(NormTracer):
    """normsurgeon's tracer, also keeping every norm site (found by the protocol too) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_norm(m) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> tuple[fx.Graph | None, str | None]:
    try:
        return _SiteTracer().trace(model), None
    except Exception as e:  # noqa: BLE001 - any failure means "not traceable": the module-order fallback
        return None, first_line(e)


def _called(graph: fx.Graph) -> set[str]:
    return {n.target for n in graph.nodes if n.op == "call_module"}


def _inside_norm(name: str, norms) -> bool:
    return any(name.startswith(n + ".") for n, _ in norms if n)


def _safe(fn: Callable, inplace: bool) -> Callable:
    return (lambda y: fn(y.clone())) if inplace else fn


def _posts_from_graph(graph: fx.Graph, model: nn.Module, names: set[str]) -> dict:
    from normsurgeon.layers import ProxyNorm

    modules = dict(model.named_modules())
    out = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        steps, labels, cur = [], [], node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            nxt = users[0]
            fn, label, kind = _step(nxt, cur, modules)
            if kind == "skip":
                cur = nxt
                continue
            if kind == "act" and not labels:
                steps.append(fn)
                labels.append(label)
                cur = nxt
                continue
            if kind == "module" and labels and isinstance(modules.get(nxt.target), ProxyNorm):
                steps.append(modules[nxt.target])
                labels.append(label)
            break
        if steps:
            out[node.target] = (_chain(steps), "+".join(labels))
    return out


def _step(node: fx.Node, src: fx.Node, modules: dict):
    """``(callable, label, kind)`` for applying ``node`` to ``src``'s output: kind "act", "skip",
    "module" (another module) or "other"."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if m is None or len(node.args) != 1 or node.kwargs:
            return None, "", "other"
        if isinstance(m, PASS_THROUGH):
            return None, "", "skip"
        if isinstance(m, ACTIVATIONS):
            return _safe(m, bool(getattr(m, "inplace", False))), type(m).__name__, "act"
        return m, type(m).__name__, "module"
    if node.op in ("call_function", "call_method") and node.args and node.args[0] is src:
        rest, kwargs = node.args[1:], dict(node.kwargs)
        if any(isinstance(a, fx.Node) for a in list(rest) + list(kwargs.values())):
            return None, "", "other"
        if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
            inplace = bool(kwargs.pop("inplace", False))
            fn = node.target
            return _safe(lambda y: fn(y, *rest, **kwargs), inplace), fn.__name__, "act"
        if node.op == "call_function" and node.target in (F.dropout, operator.getitem):
            return None, "", "skip" if node.target is F.dropout else "other"
        if node.op == "call_method" and node.target in ACTIVATION_METHODS:
            method = node.target
            return (lambda y: getattr(y, method)(*rest, **kwargs)), method, "act"
    return None, "", "other"


def _chain(steps: list[Callable]) -> Callable:
    def post(y):
        for s in steps:
            y = s(y)
        return y

    return post


def _posts_from_order(model: nn.Module, names: set[str]) -> dict:
    """Fallback: the first module registered after the norm (outside it), if it is an activation."""
    ordered = [(n, m) for n, m in model.named_modules()
               if (n in names or not list(m.children())) and not any(n.startswith(k + ".") for k in names if k)]
    out = {}
    for i, (name, _) in enumerate(ordered):
        if name not in names:
            continue
        for n, m in ordered[i + 1:]:
            if isinstance(m, PASS_THROUGH):
                continue
            if isinstance(m, ACTIVATIONS):
                out[name] = (_safe(m, bool(getattr(m, "inplace", False))), type(m).__name__)
            break
    return out
