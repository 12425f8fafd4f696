"""``fold``: before deployment, make every BN-derived constant vanish into the convolutions.

Rules (``fold_rules.py``): which layers are a constant per-channel affine at eval (torch BN of every
rank, SyncBatchNorm, timm BN subclasses, frozen BN, and anything exposing ``eval_affine()``), and
which convs hide a constant weight transform (normsurgeon WS convs, timm StdConv2d/ScaledStdConv2d).

Plan, per affine site, in topological order (docs/recipes.md says what each recipe leaves foldable):

1. **backward**: the site's input is a conv / conv-transpose / linear output used by nothing else
   -> scale its output channels, fold the shift into its bias (a timm BN-act keeps its act/drop);
2. **merge**: the input is another leftover affine used by nothing else -> compose the two;
3. **forward**: every consumer is a conv/linear -> scale their input channels (always exact) and
   move the shift into their biases, only when no consumer zero-pads (or is a transpose conv);
4. otherwise one ``ChannelAffine`` stays, and the report says why.

Paths: ``fx`` when torch.fx can trace the model, else ``module-swap`` (autograd-linked hooks, see
``fold_graph.py``). Both never fold into a conv that is called twice (pytorch#104593).
"""
from __future__ import annotations

import copy
import time

import torch
from torch import fx, nn

from normsurgeon import provenance
from normsurgeon.errors import VerificationError
from normsurgeon.graph.modules import check_patterns_used, describe, set_submodule
from normsurgeon.graph.inputs import Inputs, call, first_dtype, positional, resolve
from normsurgeon.graph.probe import input_shape_of, map_input, run_probe
from normsurgeon.graph.trace import check_traced, try_trace
from normsurgeon.graph.verify import compare, raise_if_unverifiable
from normsurgeon.layers.affine import ChannelAffine
from normsurgeon.layers.norm_act import NormAct
from normsurgeon.passes import fold_math as fm
from normsurgeon.passes.fold_graph import Site, fx_sites, swap_sites
from normsurgeon.passes.fold_rules import plain_conv, ws_rule
from normsurgeon.report import Change, SurgeryResult

TOLERANCE = 1e-5


def fold(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...] | list[int] | None = None,
    example_inputs=None,
    keep: tuple[str, ...] | list[str] = (),
    verify: bool = False,
) -> SurgeryResult:
    """Fold BN, weight standardization and other constant per-channel affines into neighbouring
    convs/linears (on a copy; ``model`` is untouched).

    ``keep``: glob patterns of layer names to leave alone. ``verify``: raise VerificationError when the
    folded model's eval output differs by more than 1e-5 relative on the probe input.
    ``example_inputs``: what to run the model on instead of a random ``input_shape`` probe (a tensor,
    a tuple of tensors, or a dict of tensors by argument name; integer inputs stay integer).
    """
    t0 = time.perf_counter()
    x, shape_from = resolve(model, input_shape, example_inputs)
    x, _ = run_probe(model, x)  # the model must run on the probe: else the shape is the user's to fix
    shape = input_shape_of(x)
    new = copy.deepcopy(model).eval()
    changes: list[Change] = []
    _standardize(new, changes, keep)
    before = _as_leaves(new, keep, changes)
    traced = try_trace(new, x)
    fx_error = f"torch.fx cannot trace: {traced.error}"
    path = "module-swap"
    if traced.ok:
        with torch.no_grad():
            eager = call(new, x)
        fx_error = check_traced(traced.graph_module, eager, x)
        if fx_error is None:
            try:
                new, path = _fold_fx(traced.graph_module, x, keep, changes, before), "fx"
            except _NotRunnable as e:
                fx_error = f"the traced graph does not run ({e})"
    if path == "module-swap":
        new = copy.deepcopy(model).eval()
        changes = []
        _standardize(new, changes, keep)
        before = _as_leaves(new, keep, changes)
        _fold_swap(new, x, keep, changes, before)  # errors here are normsurgeon's: they propagate
        changes.insert(0, Change("<model>", "fallback", detail=fx_error))
    new.eval()
    for attr in ("pretrained_cfg", "default_cfg"):  # timm's input size, for later default shapes
        if hasattr(model, attr) and not hasattr(new, attr):
            setattr(new, attr, getattr(model, attr))
    changes = list(dict.fromkeys(changes))  # a layer reported by two stages once
    check_patterns_used(keep, [n for n, _ in model.named_modules()] + [c.target for c in changes], "--keep")
    fold_s = time.perf_counter() - t0
    ver = compare(model, new, x, TOLERANCE)
    info: dict = {}
    if not ver.ok and ver.problem is None and first_dtype(x) == torch.float32:
        ver, info = _recheck_float64(model, new, x, ver)
    if verify:
        raise_if_unverifiable(ver, "fold")
    if verify and not ver.ok:
        raise VerificationError(
            f"fold changed outputs by {ver.max_rel_error:.2e} relative (limit {TOLERANCE:.0e}); "
            "rerun without --verify to see the report, or --keep the offending layers"
        )
    provenance.record(new, model, "fold", {"input_shape": list(shape), "keep": list(keep)})
    remaining = sum(1 for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    info.update({"input_shape": list(shape), "input_shape_from": shape_from, "fold_seconds": round(fold_s, 4),
                 "remaining_batchnorm": remaining})
    return SurgeryResult(model=new, changes=changes, verb="fold", path=path, verification=ver, info=info)


def _recheck_float64(model: nn.Module, new: nn.Module, x: torch.Tensor, ver32):
    """Some float32 nets amplify rounding far beyond 1e-5 (timm's fbnetv3_b, random weights: its own
    float32 output differs from its float64 run by 1.6e-3), so an exact fold can miss the float32 gate.
    Then: fold a float64 copy and compare in float64 (an exact fold agrees to ~1e-12, a wrong one does
    not), and measure the model's own float32 noise. The fold passes if the float64 check holds and the
    float32 error is within 1e-5 + 4 x that noise; the verdict's tolerance says which limit was used."""
    from normsurgeon.graph.verify import output_error
    from normsurgeon.report import Verification

    try:
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            noise = output_error(call(m64, map_input(x, torch.Tensor.double)), call(model.eval(), x))[1]
        if isinstance(x, Inputs):
            ver64 = fold(m64, example_inputs=map_input(x, torch.Tensor.double)).verification
        else:
            ver64 = fold(m64, input_shape=input_shape_of(x)).verification
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps the float32 verdict
        return ver32, {}
    info = {"float64_max_rel_error": ver64.max_rel_error, "float32_noise_of_model": noise}
    if not ver64.ok:
        return ver32, info
    limit = TOLERANCE + 4 * noise
    info["note"] = (f"float32 error {ver32.max_rel_error:.1e} is rounding amplified by the network (the model's own "
                    f"float32 output is off its float64 run by {noise:.1e}); the fold is exact in float64 "
                    f"({ver64.max_rel_error:.1e})")
    return Verification(ver32.max_abs_error, ver32.max_rel_error, tolerance=limit, compared=ver32.compared,
                        note=ver32.note), info


class _NotRunnable(Exception):
    pass


# ----------------------------------------------------------------------------------- WS rule
def _standardize(model: nn.Module, changes: list[Change], keep=()) -> None:
    from normsurgeon.graph.modules import matches

    for name, m in list(model.named_modules()):
        rule = ws_rule(m)
        if rule is None:
            continue
        if matches(name, keep):
            changes.append(Change(name, "kept", describe(m), describe(m), "matches keep"))
            continue
        with torch.no_grad():
            plain = plain_conv(m, rule.weight(m))
        set_submodule(model, name, plain)
        changes.append(Change(name, "folded", describe(m), describe(plain), rule.describe(m)))


# ----------------------------------------------------------------------------------- planning
def _plan(sites: list[Site], layers: dict[str, nn.Module]) -> None:
    """Decide and do the weight arithmetic; sites get ``state`` and ``into``."""
    by_key = {s.key: s for s in sites}

    def relink(old: Site, new_src):
        for s in sites:
            if s.src == ("site", old.key):
                s.src = new_src
                if new_src is None:
                    s.src_note = f"{old.name} applies an activation after its affine"

    for a in sites:
        if a.src is None:
            continue
        kind, ref = a.src
        if kind == "layer":
            fm.fold_output(layers[ref], *a.affine)
            a.state, a.into = "folded", ref
            relink(a, ("layer", ref) if a.extras is None else None)
            continue
        p = by_key[ref]
        if p.state != "pending" or p.extras is not None:
            a.src_note = f"{p.name} applies an activation after its affine" if p.extras is not None else \
                f"{p.name} was already folded"
            continue
        p.affine = fm.compose(p.affine, a.affine)
        a.state, a.into = "merged", p.name
        p.detail.append(f"absorbed {a.name}")
        if a.extras is None:
            p.sinks, p.sink_note = a.sinks, a.sink_note
            relink(a, ("site", p.key))
        else:
            p.sinks, p.sink_note = None, f"feeds the activation of {a.name}"
            relink(a, None)

    for a in sites:
        if a.state != "pending":
            continue
        if a.extras is not None:
            a.sink_note = "an activation follows the affine inside the layer"
            continue
        if not a.sinks:
            continue
        blockers = [(n, fm.shift_blocker(layers[n])) for n in a.sinks]
        blocked = [f"{n}: {why}" for n, why in blockers if why]
        if blocked:
            a.sink_note = "shift cannot pass " + "; ".join(blocked)
            continue
        for n in a.sinks:
            fm.fold_input(layers[n], *a.affine)
        a.state, a.into = "forward", ", ".join(a.sinks)


def _record(sites: list[Site], changes: list[Change]) -> None:
    for s in sites:
        extra = f"kept {describe(s.extras)}" if s.extras is not None else ""
        notes = s.detail + ([extra] if extra else [])
        if s.state == "folded":
            changes.append(Change(s.name, "folded", s.before, s.into, "; ".join(["backward"] + notes)))
        elif s.state == "merged":
            changes.append(Change(s.name, "merged", s.before, s.into,
                                  "; ".join(["composed with the preceding per-channel affine"] + notes)))
        elif s.state == "forward":
            changes.append(Change(s.name, "folded", s.before, s.into,
                                  "; ".join(["forward into the consumers"] + notes)))
        else:
            why = [w for w in (s.src_note, s.sink_note) if w]
            changes.append(Change(s.name, "affine", s.before, f"ChannelAffine({s.channels})",
                                  "; ".join(["cannot fold: " + ("; ".join(why) or "no neighbouring conv")] + notes)))


def _leftover(s: Site) -> nn.Module:
    scale, shift = (t.to(device=s.ref.device, dtype=s.ref.dtype) for t in s.affine)
    aff = ChannelAffine(scale, shift)
    return aff if s.extras is None else NormAct(aff, act=s.extras)


# ----------------------------------------------------------------------------------- fx path
def _rename(sites: list[Site], before: dict[str, str] | None) -> None:
    """Report a layer swapped by ``_as_leaves`` under its own name and original description."""
    for s in sites:
        owner = s.name[: -len(".norm")] if s.name.endswith(".norm") else s.name
        if before and owner in before:
            s.name, s.before = owner, before[owner]


def _as_leaves(model: nn.Module, keep, changes: list[Change]) -> dict[str, str]:
    """Affine layers that fx would trace through (torchvision's FrozenBatchNorm2d, timm's
    FrozenBatchNormAct2d) become ``ChannelAffine`` (+ their act) so the graph shows them as one call.
    Returns {name: description of the original} for the report."""
    from normsurgeon.graph.modules import matches
    from normsurgeon.graph.trace import norm_leaf_types
    from normsurgeon.passes.fold_rules import affine_rule, extras

    leaves = norm_leaf_types()
    before: dict[str, str] = {}
    for name, m in list(model.named_modules()):
        if not name or isinstance(m, leaves) or matches(name, keep) or any(name.startswith(p + ".") for p in before):
            continue
        rule = affine_rule(m)
        aff = rule.extract(m) if rule else None
        if isinstance(aff, str):
            changes.append(Change(name, "kept", describe(m), describe(m), aff))
        if aff is None or isinstance(aff, str):
            continue
        ref = next((t for t in list(m.buffers()) + list(m.parameters()) if t.is_floating_point()), aff[0].float())
        layer = ChannelAffine(*(t.to(device=ref.device, dtype=ref.dtype) for t in aff))
        ex = extras(m)
        set_submodule(model, name, layer if ex is None else NormAct(layer, act=ex))
        before[name] = describe(m)
    return before


def _fold_fx(gm: fx.GraphModule, x: torch.Tensor, keep, changes: list[Change], before=None) -> fx.GraphModule:
    gm.eval()

    def shapes():
        try:
            with torch.no_grad():
                _Shapes(gm).run(*positional(gm, x))
        except Exception as e:  # noqa: BLE001 - leaves the swap path to try
            raise _NotRunnable(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}") from None

    sites, calls = fx_sites(gm, keep, changes, shapes)
    _rename(sites, before)
    layers = dict(gm.named_modules())
    _plan(sites, layers)
    _record(sites, changes)
    g = gm.graph
    for i, s in enumerate(sites):
        node = s.node
        if s.state in ("folded", "merged", "forward"):
            if s.extras is None:
                node.replace_all_uses_with(s.input_node)
                g.erase_node(node)
            else:
                _put(gm, s, s.extras, calls, i)
        else:
            _put(gm, s, _leftover(s), calls, i)
    gm.delete_all_unused_submodules()
    g.lint()
    gm.recompile()
    return gm


class _Shapes(fx.Interpreter):
    """Runs the graph once and stores each node's output shape in ``node.meta["ns_shape"]``."""

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["ns_shape"] = tuple(out.shape)
        return out


def _put(gm: fx.GraphModule, s: Site, module: nn.Module, calls, i: int) -> None:
    """Make site ``s``'s node call ``module``: in place of the layer when the layer has one call site,
    else under a new name (a shared layer's other call sites keep theirs)."""
    node = s.node
    if node.op == "call_module" and calls[node.target] == 1:
        set_submodule(gm, node.target, module)
        return
    target = f"{s.name.replace('.', '_')}_fold{i}"
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(target, (s.input_node,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


# ----------------------------------------------------------------------------------- swap path
def _fold_swap(model: nn.Module, x: torch.Tensor, keep, changes: list[Change], before=None) -> None:
    sites, _ = swap_sites(model, x, keep, changes)
    _rename(sites, before)
    layers = dict(model.named_modules())
    _plan(sites, layers)
    _record(sites, changes)
    for s in sites:
        if s.state in ("folded", "merged", "forward"):
            set_submodule(model, s.key, s.extras if s.extras is not None else nn.Identity())
        else:
            set_submodule(model, s.key, _leftover(s))
