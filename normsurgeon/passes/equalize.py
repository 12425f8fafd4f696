"""``equalize``: equi-normalization (ENorm; Stock, Graham, Gribonval, Jegou, ICLR 2019;
facebookresearch/enorm ``enorm/enorm/enorm.py`` at 0d6b7f51: ``balancer = (R / (L * C)) ** 0.5``, momentum
buffers multiplied by 1/balancer and balancer, biases and the last layer not balanced), made exactly
function-preserving.

For a hidden channel j between a *producer* (conv/linear output channel j, or the per-channel affine
of a BN/GN) and its *consumers* (the conv/linear input slices that read channel j, through
positively homogeneous ops only: ReLU, LeakyReLU, PReLU, identity, dropout, max/avg pooling,
flatten), scaling the producer's filter j **and bias j** (for a norm: gamma_j and beta_j) by d_j > 0
and every consumer slice by 1/d_j leaves the function unchanged. ENorm picks
``d_j = sqrt(R_j / (c L_j))`` with ``L_j`` = norm of the producer's filter j (|gamma_j| for a norm) and
``R_j`` = norm of all consumer slices of j (reference enorm.py; c = 1 minimizes the total squared L2
norm of the weights exactly; the reference runs used c = 1.1 for conv nets and 1.2 for FC nets),
cycling over the pairs Sinkhorn-Knopp style.

Differences from the reference, all for exactness: biases are scaled; every pair is balanced (the
reference skips the last); a norm layer is never crossed -- a conv feeding a BN/GN is left alone and
the norm's own affine is the producer instead, which is exact in train and eval mode, so BN need not
be folded first. Channels that reach a residual add, a concat, a non-homogeneous activation (SiLU,
GELU, ReLU6, sigmoid...) or the model output are skipped and reported: their scale is tied to other
layers or to the output.

Paths: ``fx`` when torch.fx traces the model into a graph that computes what the model computes on
the probe; else ``module-swap``, where the same pairs are read off the autograd graph of one probe
forward (``equalize_swap``) and the report says why the graph path was not taken.

A "sweep" is one pass over all pairs (Gauss-Seidel, fresh norms each time). :func:`build_plan` and
:func:`sweep` are shared with the SGD-interleaving callback in ``normsurgeon.training``.
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.conv import _ConvNd

from normsurgeon import provenance
from normsurgeon.errors import RecipeError, VerificationError, first_line
from normsurgeon.graph.inputs import call, input_shape_of, positional, resolve
from normsurgeon.graph.probe import run_probe
from normsurgeon.graph.trace import check_traced, try_trace
from normsurgeon.graph.verify import compare, raise_if_unverifiable
from normsurgeon.report import Change, SurgeryResult

TOLERANCE = 1e-5

_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool2d, torch.max_pool2d,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_SHAPE_ONLY = {"size", "dim"}


@dataclass
class Consumer:
    name: str  # module name (conv or linear)
    block: int  # input features per channel (1 for a conv; H*W after a flatten into a linear)


@dataclass
class Pair:
    producer: str
    kind: str  # "weight" (conv/linear) or "norm" (per-channel affine of a BN/GN)
    channels: int
    consumers: list[Consumer] = field(default_factory=list)


@dataclass
class Plan:
    pairs: list[Pair]
    skipped: list[Change]


# ------------------------------------------------------------------------------------------ plan

# exact types only: subclasses (weight-standardized convs, BN with a fused activation, padding-"same"
# convs) transform weights or outputs in ways a channel scale does not pass through
_WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm)


def _producer_kind(m: nn.Module) -> str | None:
    if type(m) in _WEIGHT_TYPES:
        return "weight"
    if type(m) in _NORM_TYPES and getattr(m, "weight", None) is not None and getattr(m, "bias", None) is not None:
        return "norm"
    return None


def _channels(m: nn.Module) -> int:
    if isinstance(m, _ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.weight.numel()


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_flatten(node: fx.Node, src: fx.Node) -> bool:
    a, b = _shape(src), _shape(node)
    return a is not None and b is not None and len(a) > 2 and len(b) == 2 and b[0] == a[0] \
        and b[1] == math.prod(a[1:])


def _spatial_mean(user: fx.Node, src: fx.Node) -> bool:
    """A mean over spatial axes only (global average pooling written as ``x.mean((2, 3))``)."""
    shape = _shape(src)
    dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
    if shape is None or len(shape) <= 2 or user.args[0] is not src:
        return False
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
    return bool(dims) and all(isinstance(d, int) for d in dims) and min(d % len(shape) for d in dims) >= 2


def _follow(gm: fx.GraphModule, start: fx.Node, modules: dict, calls: dict) -> tuple[list[Consumer], str | None]:
    """Consumers of ``start``'s channels through homogeneous ops, or (.., reason) when blocked."""
    consumers: list[Consumer] = []
    stack: list[tuple[fx.Node, int]] = [(start, 1)]
    seen = set()
    while stack:
        node, block = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            nxt = _classify(user, node, modules)
            if nxt == "shape":
                continue
            if nxt == "pass":
                stack.append((user, block))
            elif nxt == "flatten":
                if block != 1:
                    return consumers, f"reshaped twice at {user.name}"
                src = _shape(node)
                stack.append((user, math.prod(src[2:])))
            elif nxt == "consumer":
                mod = modules[user.target]
                if isinstance(mod, _ConvNd) and block != 1:
                    return consumers, f"{user.target} reads a flattened tensor"
                if calls.get(user.target, 0) != 1:
                    return consumers, f"consumer {user.target} is called {calls.get(user.target, 0)} times"
                if user.args[0] is not node or len(user.args) > 1 or user.kwargs:
                    return consumers, f"{user.target} is called with extra arguments"
                if isinstance(mod, nn.Linear) and len(_shape(node) or ()) != 2:
                    return consumers, f"{user.target} is a linear on a tensor of rank != 2"
                consumers.append(Consumer(user.target, block))
            else:
                return consumers, nxt
    return consumers, None


def _classify(user: fx.Node, src: fx.Node, modules: dict) -> str:
    """pass | flatten | consumer | shape | <reason the channel scale cannot cross ``user``>."""
    if user.op == "output":
        return "reaches the model output"
    if user.op == "call_module":
        mod = modules.get(user.target)
        if isinstance(mod, nn.Flatten):
            return "flatten" if _is_flatten(user, src) else f"{user.target}: flatten of an unexpected shape"
        if isinstance(mod, _HOMOGENEOUS_MODULES):
            return "pass"
        if type(mod) in _WEIGHT_TYPES:
            return "consumer"
        return f"feeds {type(mod).__name__} {user.target} (not positively homogeneous)"
    if user.op == "call_function":
        if user.target in _HOMOGENEOUS_FUNCTIONS:
            if any(isinstance(a, fx.Node) and a is not src for a in list(user.args[1:]) + list(user.kwargs.values())):
                return f"{user.name}: computed arguments"
            return "pass"
        if user.target is torch.flatten:
            return "flatten" if _is_flatten(user, src) else f"{user.name}: flatten of an unexpected shape"
        if user.target in (operator.add, torch.add, operator.iadd):
            return f"reaches a residual add ({user.name})"
        if user.target is torch.cat:
            return f"reaches a concat ({user.name})"
        if user.target is getattr and user.args[1] in ("shape",):
            return "shape"
        name = getattr(user.target, "__name__", str(user.target))
        return f"reaches {name} ({user.name}), not positively homogeneous"
    if user.op == "call_method" and user.target == "mean" or user.op == "call_function" and user.target is torch.mean:
        return "pass" if _spatial_mean(user, src) else f"reaches a mean over channels ({user.name})"
    if user.op == "call_method":
        if user.target in _SHAPE_ONLY:
            return "shape"
        if user.target in _HOMOGENEOUS_METHODS:
            return "pass"
        if user.target in _FLATTEN_METHODS:
            return "flatten" if _is_flatten(user, src) else f"{user.name}: {user.target} of an unexpected shape"
        return f"reaches .{user.target}() ({user.name}), not positively homogeneous"
    return f"used by {user.op} {user.name}"


def build_plan(model: nn.Module, x) -> Plan:
    """The balanceable pairs of ``model`` (not modified; its train/eval state is restored)."""
    return plan_for(model, x)[0]


def plan_for(model: nn.Module, x) -> tuple[Plan, str, str | None]:
    """(plan, path, why the graph path was not taken): read off the torch.fx graph when it traces and
    computes what the model computes on the probe, else off the autograd graph of one probe forward."""
    gm, problem = _graph_of(model, x)
    if problem is None:
        return _fx_plan(gm), "fx", None
    from normsurgeon.passes.equalize_swap import swap_plan

    return swap_plan(model, x), "module-swap", problem


def _graph_of(model: nn.Module, x) -> tuple[fx.GraphModule | None, str | None]:
    traced = try_trace(model, x)
    if not traced.ok:
        return None, f"torch.fx cannot trace: {traced.error}"
    gm = traced.graph_module
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            eager = call(model, x)
        problem = check_traced(gm, eager, x)
        if problem is None:
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(*positional(gm, x))
            except Exception as e:  # noqa: BLE001 - same as a failing graph
                problem = f"the traced graph fails on the probe input ({type(e).__name__}: {first_line(e)})"
    finally:
        model.train(was)
    return gm, problem


def _fx_plan(gm: fx.GraphModule) -> Plan:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules.get(node.target)
        kind = _producer_kind(mod)
        if kind is None:
            continue
        if calls[node.target] != 1:
            skipped.append(Change(node.target, "skipped", type(mod).__name__, "",
                                  f"called {calls[node.target]} times (shared module)"))
            continue
        if isinstance(mod, nn.Linear) and len(_shape(node) or ()) != 2:
            skipped.append(Change(node.target, "skipped", type(mod).__name__, "", "linear output of rank != 2"))
            continue
        consumers, reason = _follow(gm, node, modules, calls)
        if reason is None and not consumers:
            reason = "no conv/linear consumes its output"
        if reason is not None:
            skipped.append(Change(node.target, "skipped", type(mod).__name__, "", f"channels tied: {reason}"))
            continue
        pairs.append(Pair(node.target, kind, _channels(mod), consumers))
    return Plan(pairs, skipped)


# ----------------------------------------------------------------------------------------- sweep

ScaleHook = Callable[[nn.Parameter, torch.Tensor], None]


def _producer_sq(mod: nn.Module, kind: str) -> torch.Tensor:
    w = mod.weight.detach().double()
    if kind == "norm":
        return w * w
    return w.reshape(w.shape[0], -1).pow(2).sum(1)


def _consumer_view(mod: nn.Module, channels: int, block: int) -> torch.Tensor:
    """Consumer weight as (channels, rows, cols-per-channel) over its input slices (double)."""
    w = mod.weight.detach().double()
    if isinstance(mod, nn.Linear):
        return w.reshape(w.shape[0], channels, block).transpose(0, 1)
    groups = mod.groups
    per_in = w.shape[1]
    out_per = w.shape[0] // groups
    # input channel j lives in group j // per_in, at column j % per_in, rows of that group
    v = w.reshape(groups, out_per, per_in, -1).permute(0, 2, 1, 3)  # (groups, per_in, out_per, k)
    return v.reshape(channels, out_per, -1)


def _consumer_scale(mod: nn.Module, inv: torch.Tensor, block: int) -> torch.Tensor:
    """A tensor shaped for ``mod.weight`` that multiplies input slice j by inv[j]."""
    w = mod.weight
    if isinstance(mod, nn.Linear):
        return inv.repeat_interleave(block).reshape(1, -1)
    groups = mod.groups
    per_in = w.shape[1]
    out_per = w.shape[0] // groups
    s = inv.reshape(groups, 1, per_in).expand(groups, out_per, per_in).reshape(w.shape[0], per_in)
    return s.reshape(w.shape[0], per_in, *([1] * (w.dim() - 2)))


def _scale_(p: torch.Tensor | None, s: torch.Tensor, hook: ScaleHook | None) -> None:
    if p is None:
        return
    s = s.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        p.mul_(s)
    if hook is not None and isinstance(p, nn.Parameter):
        hook(p, s)


def sweep(model: nn.Module, plan: Plan, c: float = 1.0, hook: ScaleHook | None = None,
          pairs: list[Pair] | None = None) -> None:
    """One ENorm cycle over ``pairs`` (default: all of the plan), in place. ``hook(param, scale)`` is
    called after each parameter is multiplied by ``scale`` (the optimizer-state rescaling hook)."""
    for pair in pairs if pairs is not None else plan.pairs:
        prod = model.get_submodule(pair.producer)
        left = _producer_sq(prod, pair.kind)
        right = torch.zeros_like(left)
        cons = [(model.get_submodule(cn.name), cn.block) for cn in pair.consumers]
        for mod, block in cons:
            right += _consumer_view(mod, pair.channels, block).pow(2).sum(dim=(1, 2))
        lnorm, rnorm = left.sqrt(), right.sqrt()
        d = torch.sqrt(rnorm / (c * lnorm))
        d = torch.where(torch.isfinite(d) & (d > 0), d, torch.ones_like(d))
        shape = (-1,) + (1,) * (prod.weight.dim() - 1)
        _scale_(prod.weight, d.reshape(shape), hook)
        _scale_(prod.bias, d, hook)
        for mod, block in cons:
            _scale_(mod.weight, _consumer_scale(mod, 1.0 / d, block), hook)


def weight_norm(model: nn.Module) -> float:
    """sqrt of the sum of squares of every parameter named ``weight`` (convs, linears, norm scales)."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "weight":
            total += float(p.detach().double().pow(2).sum())
    return math.sqrt(total)


# ------------------------------------------------------------------------------------------- API

def equalize(model: nn.Module, *, iters: int = 10, c: float = 1.0, verify: bool = False,
             input_shape: tuple[int, ...] | list[int] | None = None, example_inputs=None) -> SurgeryResult:
    """Rebalance weights across positively homogeneous activations (a copy; the input is untouched).

    ``iters``: Sinkhorn sweeps over all pairs. ``c``: ENorm's asymmetry (1 = minimize the plain
    squared L2 norm of the weights; the reference used 1.1 for conv nets). ``verify``: raise if the
    eval outputs change by more than 1e-5 relative. Only tensor values change (provenance
    ``replay: False``). ``example_inputs``: a tensor, tuple or dict of tensors to run the model on
    instead of a random ``input_shape`` probe.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise RecipeError(f"bad --iters {iters!r}: use an integer >= 0")
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise RecipeError(f"bad --c {c!r}: use a finite positive number (1 minimizes the plain L2 norm)")
    x, _ = resolve(model, tuple(input_shape) if input_shape else None, example_inputs)
    x, _ = run_probe(model, x)  # the model must run on the probe: else the shape is the user's to fix
    new = copy.deepcopy(model)
    plan, path, fallback = plan_for(new, x)
    before = weight_norm(new)
    for _ in range(iters):
        sweep(new, plan, c)
    after = weight_norm(new)
    changes = [Change("<model>", "fallback", detail=fallback)] if fallback else []
    changes += plan.skipped
    for pair in plan.pairs:
        changes.append(Change(pair.producer, "equalized", f"{pair.channels} channels", "",
                              "balanced against " + ", ".join(cn.name for cn in pair.consumers)))
    new.train(model.training)
    ver = compare(model, new, x, TOLERANCE)
    if verify:
        raise_if_unverifiable(ver, "equalize")
    if verify and not ver.ok:
        raise VerificationError(f"equalize changed outputs by {ver.max_rel_error:.2e} relative (limit {TOLERANCE:.0e})")
    provenance.record(new, model, "equalize",
                      {"replay": False, "iters": iters, "c": c, "input_shape": list(input_shape_of(x))})
    return SurgeryResult(
        model=new, changes=changes, verb="equalize", path=path, verification=ver,
        info={"weight_norm_before": before, "weight_norm_after": after, "iters": iters, "c": c,
              "pairs": len(plan.pairs), "skipped": len(plan.skipped), "input_shape": list(input_shape_of(x))},
    )
