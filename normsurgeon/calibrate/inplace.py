"""Which BN layers may normalize their input in place during the statistics pass.

A BN's output is a fresh tensor; allocating it and touching its pages for the first time costs more
than the normalization's arithmetic on large maps (on ResNet-50 at 224x224 the BN layers are ~15% of
an eval forward on CPU, mostly that). In the statistics pass nothing keeps activations, so a BN whose
input is used by nothing else can overwrite that input with its output.

Only models whose every forward is library code qualify: every module's class comes from torch,
torchvision, timm or normsurgeon, no module has hooks or a forward set on the instance, and no
global module hook is registered. A user-written forward can keep an activation where no graph
shows it (a deque on ``self``, a module-level list, a hook on a wrapper) and read it after the BN
overwrote it, or on the next batch; and tracing runs its Python side effects. Within such models,
"used by nothing else" is read from the torch.fx graph of a structural copy (the model itself is
never traced), for the plainest case only:

- the BN is a plain ``nn.BatchNorm1d/2d/3d`` (not a subclass: timm's BatchNormAct2d adds an
  activation), called at exactly one place in the graph, with the tensor as its only argument;
- its input is produced by a torch conv or linear module of exactly that class (a fresh tensor,
  never an alias; a subclass could return a buffer or keep its output), itself called at exactly
  one place, whose output has no user but the BN;
- tracing neither failed nor changed any module attribute (defence in depth).

At run time the collector also checks, on every call, that the BN received the very tensor its
producer returned in this call (``is``), that the tensor is not a view, and that no hook was added
to either module or globally since; otherwise the BN runs its own forward. Anything else (other
models, residual sums, concatenations) keeps the ordinary out-of-place forward: the statistics are
the same either way.
"""
from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.modules import module as _torch_module

from normsurgeon.errors import first_line
from normsurgeon.graph.trace import try_trace
from normsurgeon.switch import OffSwitch

PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FRESH_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear)
LIBRARIES = ("torch", "torchvision", "timm", "normsurgeon")
# ``with out_of_place():`` no BN normalizes in place: benchmarks and tests compare the two paths
out_of_place = OffSwitch()
# torch registers global hooks into these dicts in place, so references taken once stay current
_GLOBAL_HOOKS = tuple(getattr(_torch_module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def in_place_producers(model: nn.Module) -> tuple[dict[nn.Module, nn.Module], str]:
    """``{bn: producer}`` for every BN of ``model`` that may normalize in place, and a one-line reason
    when none may for a model-wide cause ("" otherwise)."""
    if out_of_place:
        return {}, "turned off in this process (normsurgeon.calibrate.inplace.out_of_place)"
    if any(_GLOBAL_HOOKS):
        return {}, "global module hooks are registered"
    for name, m in model.named_modules():
        where = name or "the model"
        if type(m).__module__.split(".")[0] not in LIBRARIES:
            return {}, (f"{where} ({type(m).__name__}) runs its own forward code; only torch, torchvision, timm "
                        f"and normsurgeon modules run in place")
        if _hooked(m) or "forward" in vars(m):
            return {}, f"{where} has hooks or an instance-level forward"
    return pairs_from_graph(model)


def pairs_from_graph(model: nn.Module) -> tuple[dict[nn.Module, nn.Module], str]:
    """The graph half of :func:`in_place_producers`, without the library-code rule (tests use it to
    check the graph conditions on purpose-built models)."""
    try:
        shadow = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})
    except Exception as e:  # noqa: BLE001 - an attribute that refuses copying: no in-place, said why
        return {}, f"the model cannot be copied for tracing ({first_line(e)})"
    snapshot = {m: dict(vars(m)) for m in shadow.modules()}
    traced = try_trace(shadow)
    if not traced.ok:
        return {}, f"not traceable ({traced.error})"
    if any(_stores_values(m, before) for m, before in snapshot.items()):
        return {}, "its forward stores values on the model"
    gm = traced.graph_module
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: dict[nn.Module, nn.Module] = {}
    for node in gm.graph.nodes:
        producer = _fresh_single_use_input(gm, node, calls)
        if producer is None:
            continue
        bn, src = model.get_submodule(node.target), model.get_submodule(producer.target)
        if "forward" not in vars(bn) and "forward" not in vars(src):  # the graph shows the class's forward
            pairs[bn] = src
    return pairs, ""


def _fresh_single_use_input(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> fx.Node | None:
    """The producer node of ``node``'s input when ``node`` is a plain BN that may overwrite it."""
    if node.op != "call_module" or type(gm.get_submodule(node.target)) not in PLAIN_BN:
        return None
    if calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module" or calls[src.target] != 1 or len(src.users) != 1:
        return None
    if type(gm.get_submodule(src.target)) not in FRESH_PRODUCERS:
        return None
    if _hooked(gm.get_submodule(src.target)) or _hooked(gm.get_submodule(node.target)):
        return None
    return src


def _hooked(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def hooked_now(producer: nn.Module, bn: nn.Module) -> bool:
    """A forward hook on either module, or a global one, registered now (checked on every call, so
    kept to attribute lookups)."""
    return bool(_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or producer._forward_hooks or producer._forward_pre_hooks
                or bn._forward_hooks or bn._forward_pre_hooks)


def _stores_values(m: nn.Module, before: dict) -> bool:
    """The symbolic forward changed an attribute of ``m`` or put a proxy into one of its containers."""
    now = vars(m)
    if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
        return True
    for k, v in now.items():
        if k in ("_parameters", "_buffers", "_modules"):
            continue
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple, set)) else ()
        if any(isinstance(i, fx.Proxy) for i in items):
            return True
    return False
