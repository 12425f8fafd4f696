"""Who feeds whom, for fold: the affine *sites* of a model and, for each, the conv/linear or affine
site that feeds it exclusively (``src``) and the conv/linears that are its only consumers (``sinks``).

Two ways to find them, matching the two paths of every pass:

- ``fx_sites``: from a torch.fx graph (call_module nodes and functional ``F.batch_norm`` calls with
  stored statistics, pytorch#122070).
- ``swap_sites``: for models fx cannot trace. One probe forward with autograd on; forward hooks record
  each module's input and output ``grad_fn``, and the in-degree of every autograd node tells whether a
  tensor has exactly one consumer. A conv output that also feeds a residual add has in-degree 2 and is
  never folded into.

A conv or linear module called more than once is never a fold target (pytorch#104593: fx's ``fuse``
rewrote a shared conv and corrupted the other call site).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from normsurgeon.graph.autograd_walk import record_calls, users_of
from normsurgeon.graph.functional_bn import read_functional_bn
from normsurgeon.graph.trace import node_label
from normsurgeon.graph.modules import describe, matches
from normsurgeon.passes import fold_math as fm
from normsurgeon.passes.fold_rules import affine_rule, extras, not_foldable_reason
from normsurgeon.report import Change


@dataclass
class Site:
    key: str  # unique: fx node name, or module name on the swap path
    name: str  # what the report names: the module's qualified name (functional: the node name)
    before: str
    affine: tuple[torch.Tensor, torch.Tensor]  # float64 scale, shift
    extras: nn.Module | None
    ref: torch.Tensor  # dtype/device of the layer's own tensors
    calls: int = 1  # call sites of the module (1 for functional)
    src: tuple[str, str] | None = None  # ("layer", module name) | ("site", key)
    src_note: str = ""
    sinks: list[str] | None = None
    sink_note: str = ""
    node: Any = None  # fx node (fx path)
    input_node: Any = None
    state: str = "pending"  # folded | merged | forward | affine
    into: str = ""
    detail: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.affine[0].numel()


def layer_types_note(m: nn.Module) -> str:
    return f"{describe(m)} is not a plain conv/linear (its forward may transform the weight)"


def check_src_layer(m: nn.Module, name: str, calls: int, channels: int, out_rank) -> str | None:
    """Why a backward fold into ``m`` is not exact/safe (None: it is). ``out_rank()``: rank of its output
    (called only for a Linear)."""
    if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return f"its input comes from {describe(m)} ({name}), not from a conv/linear"
    if not fm.foldable_layer(m, backward=True):
        return layer_types_note(m)
    if calls != 1:
        return f"{name} is called {calls} times (shared module)"
    if fm.out_channels(m) != channels:
        return f"{name} has {fm.out_channels(m)} outputs, the norm {channels} channels"
    if isinstance(m, nn.Linear) and out_rank() != 2:
        return f"{name} output is not (N, C)"
    return None


def check_sink_layer(m: nn.Module, name: str, calls: int, channels: int, in_rank) -> str | None:
    if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return f"feeds {name} ({type(m).__name__})"
    if not fm.foldable_layer(m, backward=False):
        return f"consumer {layer_types_note(m)}"
    if calls != 1:
        return f"consumer {name} is called {calls} times (shared module)"
    if fm.in_channels(m) != channels:
        return f"consumer {name} takes {fm.in_channels(m)} channels"
    if isinstance(m, nn.Linear) and in_rank() != 2:
        return f"consumer {name} input is not (N, C)"
    return None


def _site_for_module(name: str, m: nn.Module, keep, changes: list[Change], reported: set) -> Site | str | None:
    """A Site for module ``m`` or None (not an affine layer, or left alone: reported once)."""
    rule = affine_rule(m)
    if rule is None:
        reason = not_foldable_reason(m)
        if reason and name not in reported:
            reported.add(name)
            changes.append(Change(name, "kept", describe(m), describe(m), reason))
        return None
    if matches(name, keep):
        if name not in reported:
            reported.add(name)
            changes.append(Change(name, "kept", describe(m), describe(m), "matches keep"))
        return None
    aff = rule.extract(m)
    if isinstance(aff, str):
        if name not in reported:
            reported.add(name)
            changes.append(Change(name, "kept", describe(m), describe(m), aff))
        return None
    ref = next((t for t in list(m.buffers()) + list(m.parameters()) if t.is_floating_point()), aff[0].float())
    return Site(key=name, name=name, before=describe(m), affine=aff, extras=extras(m), ref=ref)


# ------------------------------------------------------------------------------------------ fx path
_VIEW_METHODS = {"flatten", "reshape", "view"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape}


_SHAPES: list = []  # the running fx_sites call's lazy shape pass


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    if "ns_shape" not in node.meta and _SHAPES and not _SHAPES[-1][1]:
        _SHAPES[-1][1] = True
        _SHAPES[-1][0]()
    return node.meta.get("ns_shape")


def _rank(node) -> int | None:
    shape = _shape(node)
    return len(shape) if shape is not None else None


def _shape_only(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only ``node``'s shape (LeViT: ``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    if user.op == "call_method" and user.target in ("size", "dim") and user.args[:1] == (node,):
        return node not in user.args[1:]
    if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
        return user.args[0] is not node and node not in user.kwargs.values()
    if user.op == "call_function" and user.target is getattr and user.args[1:2] in (("shape",),):
        return True
    return False


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _shape_only(u, node)]


def _is_view(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target in _VIEW_METHODS)
        or (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
    )


def _functional_site(gm: fx.GraphModule, node: fx.Node, changes: list[Change]) -> Site | None:
    f, reason = read_functional_bn(gm, node)
    if f is None:
        if reason:
            changes.append(Change(node.name, "kept", "F.batch_norm", "F.batch_norm", reason))
        return None
    if f.running_mean is None or f.running_var is None or f.training is not False:
        changes.append(Change(node.name, "kept", "F.batch_norm", "F.batch_norm",
                              "functional batch_norm with batch statistics (training=True or no running stats)"))
        return None
    from normsurgeon.passes.fold_rules import _bn_affine

    rm = f.running_mean
    aff = _bn_affine(f.weight, f.bias, rm, f.running_var, f.eps, rm.numel())
    site = Site(key=node.name, name=node.name, before="F.batch_norm", affine=aff, extras=None, ref=rm)
    site.input_node = f.input
    return site


def fx_sites(gm: fx.GraphModule, keep, changes: list[Change], shapes) -> tuple[list[Site], Counter]:
    """Sites in topological order. ``shapes()`` runs the graph once to fill ``node.meta["ns_shape"]``;
    it is called only if a Linear's rank matters (a ResNet-50 fold then needs no forward pass)."""
    _SHAPES.append([shapes, False])
    try:
        return _fx_sites(gm, keep, changes)
    finally:
        _SHAPES.pop()


def _fx_sites(gm: fx.GraphModule, keep, changes: list[Change]) -> tuple[list[Site], Counter]:
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    sites: list[Site] = []
    by_node: dict[fx.Node, Site] = {}
    reported: set = set()
    for node in gm.graph.nodes:
        site = None
        if node.op == "call_module":
            site = _site_for_module(node.target, modules[node.target], keep, changes, reported)
            if site is not None:
                site.key, site.calls = node.name, calls[node.target]
                site.input_node = node.args[0] if node.args else None
        elif node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            if matches(node.name, keep):
                changes.append(Change(node.name, "kept", "F.batch_norm", "F.batch_norm", "matches keep"))
                continue
            site = _functional_site(gm, node, changes)
        if site is None:
            continue
        site.node = node
        by_node[node] = site
        sites.append(site)
        _fx_src(site, modules, calls, by_node)
        _fx_sinks(site, modules, calls)
    return sites, calls


def _fx_src(site: Site, modules, calls, by_node) -> None:
    inp = site.input_node
    chain = 0
    while _is_view(inp) and len(_value_users(inp)) == 1:
        inp, chain = inp.args[0], chain + 1
    if not isinstance(inp, fx.Node) or len(_value_users(inp)) != 1:
        site.src_note = "its input also feeds other operations" if isinstance(inp, fx.Node) else "no input node"
        return
    if inp in by_node and not chain:
        site.src = ("site", by_node[inp].key)
        return
    if inp.op != "call_module":
        site.src_note = f"its input comes from {node_label(inp)}"
        return
    m = modules[inp.target]
    rank = lambda: _rank(inp)  # noqa: E731
    if chain:  # a Linear over tokens, flattened to (N*L, C) for a BatchNorm1d (LeViT-style)
        shape = _shape(inp)
        ok = isinstance(m, nn.Linear) and _rank(site.input_node) == 2 and shape and shape[-1] == site.channels
        if not ok:
            site.src_note = f"its input is a reshaped {describe(m)}"
            return
        rank = lambda: 2  # noqa: E731
    why = check_src_layer(m, inp.target, calls[inp.target], site.channels, rank)
    if why:
        site.src_note = why
    else:
        site.src = ("layer", inp.target)


def _fx_sinks(site: Site, modules, calls) -> None:
    node = site.node
    users = list(node.users)
    if not users:
        site.sink_note = "output unused"
        return
    names = []
    for u in users:
        if u.op != "call_module" or not u.args or u.args[0] is not node or node in u.args[1:] \
                or node in u.kwargs.values():
            site.sink_note = f"feeds {node_label(u)}"
            return
        why = check_sink_layer(modules[u.target], u.target, calls[u.target], site.channels, lambda: _rank(node))
        if why:
            site.sink_note = why
            return
        names.append(u.target)
    site.sinks = names


# ------------------------------------------------------------------------------ module-swap path
def swap_sites(model: nn.Module, x: torch.Tensor, keep, changes: list[Change]) -> tuple[list[Site], Counter]:
    """Sites of a model that fx cannot trace, in call order, linked through the autograd graph."""
    modules = dict(model.named_modules())
    reported: set = set()
    site_mods: dict[str, Site] = {}
    for name, m in modules.items():
        if any(name.startswith(p + ".") for p in site_mods):
            continue
        site = _site_for_module(name, m, keep, changes, reported)
        if site is not None:
            site_mods[name] = site
    layers = {n for n, m in modules.items() if fm.foldable_layer(m, backward=True)}
    records, calls, roots = record_calls(model, x, {n: modules[n] for n in set(site_mods) | layers})
    order = list(records)
    indeg = _in_degrees(roots)
    producer_of = {}
    for n in order:
        rec = records[n]
        if rec.out_fn is not None and calls[n] == 1:
            producer_of[rec.out_fn] = n
    sites = [site_mods[n] for n in order if n in site_mods]
    sites += [s for n, s in site_mods.items() if n not in records]
    for site in sites:
        site.calls = calls[site.name]
        rec = records.get(site.name)
        if rec is None:
            site.src_note = site.sink_note = "not called on the probe input"
            continue
        if site.calls != 1:
            site.src_note = site.sink_note = f"called {site.calls} times (shared module)"
            continue
        _swap_src(site, rec, records, producer_of, indeg, modules, calls, site_mods)
        _swap_sinks(site, rec, records, indeg, modules, calls, layers)
    return sites, calls


def _in_degrees(roots) -> dict[int, int]:
    deg: Counter = Counter(id(r) for r in roots)
    for key, consumers in users_of(roots).items():
        deg[key] += len(consumers)
    return deg


def _swap_src(site, rec, records, producer_of, indeg, modules, calls, site_mods) -> None:
    fn = rec.in_fn
    src = producer_of.get(fn) if fn is not None else None
    if src is None:
        site.src_note = "its input is not produced by a conv, linear or norm module"
        return
    if indeg.get(id(fn), 0) != 1:
        site.src_note = f"the output of {src} also feeds other operations"
        return
    if src in site_mods:
        site.src = ("site", src)
        return
    why = check_src_layer(modules[src], src, calls[src], site.channels, lambda: records[src].out_rank)
    if why:
        site.src_note = why
    else:
        site.src = ("layer", src)


def _swap_sinks(site, rec, records, indeg, modules, calls, layers) -> None:
    fn = rec.out_fn
    if fn is None:
        site.sink_note = "output not tracked"
        return
    consumers = [n for n, r in records.items() if n in layers and r.in_fn is fn]
    if not consumers or indeg.get(id(fn), 0) != len(consumers):
        site.sink_note = "its output feeds operations other than convs/linears"
        return
    for n in consumers:
        why = check_sink_layer(modules[n], n, calls[n], site.channels, lambda: records[n].in_rank)
        if why:
            site.sink_note = why
            return
    site.sinks = consumers
