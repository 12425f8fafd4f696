"""``inspect``: every normalization layer, its neighbours, traceability, and what convert/fold would do.

What convert and fold *would* do is not guessed: both passes run on a copy and their change records
are attached to the layers they name, so inspect can never disagree with the real passes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from normsurgeon.errors import NormSurgeonError
from normsurgeon.graph.inputs import Inputs, resolve
from normsurgeon.graph.probe import input_shape_of, observe, run_probe
from normsurgeon.graph.trace import check_traced, node_label, try_trace
from normsurgeon.recipes import all_recipes
from normsurgeon.report import Reported


def norm_types() -> tuple[type, ...]:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    from normsurgeon.graph.trace import norm_leaf_types
    from normsurgeon.passes.fold_rules import frozen_bn_types, per_sample_norm_types

    extra = tuple(t for t in norm_leaf_types() if not issubclass(t, (_ConvNd, nn.Linear)))
    extra += frozen_bn_types() + per_sample_norm_types()
    return (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm) + extra


@dataclass
class LayerInfo:
    name: str
    type: str
    channels: int | None
    input_shape: list[int] | None
    producer: str
    consumers: list[str]
    convert: str = ""
    fold: str = ""


@dataclass
class InspectReport(Reported):
    model: str
    traceable: bool
    trace_error: str | None
    path: str  # the path convert/fold would take: fx or module-swap
    input_shape: list[int]
    layers: list[LayerInfo] = field(default_factory=list)
    recipe: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recipes: list[dict[str, str]] = field(default_factory=list)  # every --to recipe, one line each

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def inspect(model: nn.Module, to: str = "gn+ws", input_shape=None, example_inputs=None) -> InspectReport:
    x, _ = resolve(model, tuple(input_shape) if input_shape else None, example_inputs)
    x, eager = run_probe(model, x)
    shape = input_shape_of(x)
    types = norm_types()
    traced = try_trace(model, x)
    problem = check_traced(traced.graph_module, eager, x) if traced.ok else traced.error
    uses = observe(model, x, types)
    rep = InspectReport(
        model=type(model).__name__, traceable=traced.ok, trace_error=problem,
        path="fx" if problem is None else "module-swap", input_shape=list(shape), recipe=to,
        recipes=[{"recipe": e.usage(), "summary": e.summary, "folds": e.folds} for e in all_recipes()],
    )
    modules = dict(model.named_modules())
    neighbours = _fx_neighbours(traced.graph_module, types) if problem is None else {}
    for name, m in modules.items():
        if not isinstance(m, types) or any(name.startswith(p + ".") for p in _parents(rep.layers)):
            continue
        use = uses.get(name)
        if name in neighbours:
            producer, consumers = neighbours[name]
        else:
            producer = use.producer or "?" if use else "not called"
            consumers = list(use.consumers) if use else []
        rep.layers.append(LayerInfo(
            name=name, type=type(m).__name__, channels=_channels(m),
            input_shape=list(use.input_shape) if use and use.input_shape else None,
            producer=producer, consumers=consumers,
        ))
        rep.counts[type(m).__name__] = rep.counts.get(type(m).__name__, 0) + 1
    probe = {"example_inputs": x} if isinstance(x, Inputs) else {"input_shape": shape}
    _attach(rep, "convert", lambda: __import__("normsurgeon").convert(model, to, **probe).changes)
    _attach(rep, "fold", lambda: __import__("normsurgeon").fold(model, **probe).changes)
    return rep


def _parents(layers: list[LayerInfo]) -> list[str]:
    return [l.name for l in layers]


def _channels(m: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels", "normalized_shape"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list)) and v:
            return int(v[0])
    return None


def _fx_neighbours(gm: fx.GraphModule, types) -> dict[str, tuple[str, list[str]]]:
    modules = dict(gm.named_modules())
    out: dict[str, tuple[str, list[str]]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), types):
            src = node.args[0] if node.args else None
            out[node.target] = (node_label(src), [node_label(u) for u in node.users])
    return out


def _attach(rep: InspectReport, column: str, run) -> None:
    """Run a pass on a copy and put each change's summary in ``column`` of the layer it names."""
    try:
        changes = run()
    except NormSurgeonError as e:
        rep.notes.append(f"{column}: {e}")
        return
    except (AttributeError, ImportError) as e:  # pass not available in this build
        rep.notes.append(f"{column}: unavailable ({e})")
        return
    by_name = {l.name: l for l in rep.layers}
    for c in changes:
        layer = by_name.get(c.target)
        if layer is None:
            continue
        text = c.action if not c.after or c.after == c.before else f"{c.action} -> {c.after}"
        if c.detail:
            text += f" ({c.detail})"
        setattr(layer, column, text)
