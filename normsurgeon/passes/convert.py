"""``convert``: replace BatchNorm layers with a batch-independent recipe.

Two paths, reported in ``SurgeryResult.path``:

- ``fx``: the model is traced (norm layers, convs and linears kept as leaves); every BN call site is a
  node, so producers, activations and functional ``F.batch_norm`` calls are seen exactly.
- ``module-swap``: when tracing fails (pytorch#87777 and friends), BN modules are swapped in place,
  guided by forward hooks on a probe input that tell which conv feeds which BN.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from normsurgeon import provenance
from normsurgeon.errors import NormSurgeonError, RecipeError, VerificationError
from normsurgeon.graph.modules import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_TYPES,
    check_patterns_used,
    describe,
    is_batchnorm,
    matches,
    set_submodule,
)
from normsurgeon.graph.functional_bn import is_functional_bn, read_functional_bn
from normsurgeon.graph.inputs import Inputs, resolve
from normsurgeon.graph.probe import (
    ModuleUse, ProbeError, input_shape_of, observe, run_probe,
)
from normsurgeon.graph.trace import check_traced, try_trace
from normsurgeon.graph.verify import batch_independence_error, compare, raise_if_unverifiable
from normsurgeon.layers.norm_act import NormAct, bn_extras
from normsurgeon.passes import train_options
from normsurgeon.recipes import BuildContext, Recipe, get_entry, parse_recipe
from normsurgeon.recipes.registry import check_options
from normsurgeon.report import Change, SurgeryResult

FROZEN_TOLERANCE = 1e-5
BATCH_INDEPENDENCE_TOLERANCE = 1e-4


def convert(
    model: nn.Module,
    to: str | Recipe = "gn+ws",
    *,
    input_shape: tuple[int, ...] | list[int] | None = None,
    example_inputs: Any = None,
    keep: tuple[str, ...] | list[str] = (),
    layers: dict[str, str] | None = None,
    verify: bool = False,
    init: str | None = None,
    input_norm: bool | str = False,
    **options: Any,
) -> SurgeryResult:
    """Replace every BatchNorm in ``model`` (a copy; the input is untouched) following recipe ``to``.

    ``keep``: glob patterns of BN layer names to leave alone. ``layers``: per-layer recipe overrides,
    ``{"layer4.*": "gn:16"}``. ``options``: recipe options (``ws_form``, ``ws_eps``, ...).
    ``init``/``input_norm``: options for training from scratch (``passes/train_options.py``);
    ``input_norm`` is True/"bn" (online BN input normalization) or "dain" (adaptive, (N, C, L) inputs).
    ``verify``: raise if ``frozen`` changes outputs by more than 1e-5 relative, or if the result is not
    batch-independent in eval. The report always carries the measured figures.
    ``example_inputs``: what to run the model on instead of a random ``input_shape`` probe (a tensor,
    a tuple of tensors, or a dict of tensors by argument name; integer inputs such as token ids work).
    """
    recipe = to if isinstance(to, Recipe) else parse_recipe(to, **options)
    train_options.check_init(init)
    input_norm = train_options.input_norm_kind(input_norm)
    overrides = {pat: parse_recipe(r, **options) for pat, r in (layers or {}).items()}
    check_options(options, [recipe, *overrides.values()])
    x, shape_from = resolve(model, input_shape, example_inputs)
    x, eager = run_probe(model, x)  # the model must run on the probe: else the shape is the user's to fix
    shape = input_shape_of(x)

    traced = try_trace(copy.deepcopy(model), x)
    changes: list[Change] = []
    fx_error, uses = f"torch.fx cannot trace: {traced.error}", None
    if traced.ok and (problem := check_traced(traced.graph_module, eager, x)) is not None:
        fx_error = problem
    elif traced.ok:
        try:  # functional BN first, so the probe sees the materialized modules too
            _materialize_functional_bn(traced.graph_module, changes)
            traced.graph_module.recompile()
            uses = observe(traced.graph_module, x, nn.modules.batchnorm._BatchNorm)
        except ProbeError as e:  # the traced graph specialised on something the probe breaks
            changes.clear()
            fx_error = f"the traced graph fails on the probe input ({_describe_cause(e)})"
    if uses is not None:
        new, path = traced.graph_module, "fx"
        _convert_fx(new, recipe, overrides, keep, uses, changes)
        _report_untraced_bn(model, new, changes)
    else:
        new, path = copy.deepcopy(model), "module-swap"
        watch = (nn.modules.batchnorm._BatchNorm,) + ACTIVATION_TYPES
        uses = observe(new, x, watch)  # raises ProbeError (a clean user error) if the model itself fails
        _convert_swap(new, recipe, overrides, keep, uses, changes)
        changes.insert(0, Change("<model>", "fallback", detail=fx_error))

    seen = [n for n, _ in model.named_modules()] + [n for n, _ in new.named_modules()] + [c.target for c in changes]
    check_patterns_used(keep, seen, "--keep")
    check_patterns_used(list(layers or {}), seen, "--layer")
    train_options.apply_init(new, init, changes, keep=keep)
    if input_norm:
        if isinstance(x, Inputs):
            if len(x.named()) > 1 or x.kwargs:
                raise RecipeError("input_norm takes a model with one input; drop it or example_inputs")
            x = x.args[0]
        train_options.prepend_input_norm(new, x, changes, input_norm)
    new.eval()
    preserving = recipe.name == "frozen" and not overrides and init is None and not input_norm
    ver = compare(model, new, x, FROZEN_TOLERANCE if preserving else None)
    if preserving and not ver.ok and ver.problem is None:
        ver = _recheck_float64(model, new, x, ver)
    ver.batch_independent = (bi := batch_independence_error(new, x)) <= BATCH_INDEPENDENCE_TOLERANCE
    inherent = not ver.batch_independent and batch_independence_error(model, x) > BATCH_INDEPENDENCE_TOLERANCE
    if inherent:  # eval BN never mixes samples: the model's own forward does
        ver.note = "the original model already mixes samples in eval (its forward does, not a norm layer)"
    if verify:
        raise_if_unverifiable(ver, f"convert --to {recipe}")
    if verify and not ver.ok:
        raise VerificationError(
            f"convert --to {recipe} changed outputs by {ver.max_rel_error:.2e} relative (limit {ver.tolerance:.0e})"
        )
    if verify and not ver.batch_independent and not inherent:
        raise VerificationError(
            f"converted model is not batch-independent in eval: a sample's output moved by {bi:.2e} "
            "when the rest of the batch changed (see the report for layers left as BatchNorm)"
        )
    args = {"to": str(recipe), "input_shape": list(shape), "keep": list(keep), "layers": dict(layers or {})}
    args.update(options)
    if init is not None:
        args["init"] = init
    if input_norm:
        args["input_norm"] = True if input_norm == "bn" else input_norm
    provenance.record(new, model, "convert", args)
    return SurgeryResult(
        model=new, changes=changes, verb="convert", path=path, verification=ver,
        info={"recipe": str(recipe), "input_shape": list(shape), "input_shape_from": shape_from,
              "batch_independence_error": bi},
    )


def _recheck_float64(model: nn.Module, new: nn.Module, x, ver32):
    """Some float32 nets amplify rounding past 1e-5 at random init (timm regnetz_005: 1.5e-5 on one
    seed). ``frozen`` is exact, so in float64 both models agree to ~1e-12; then the float32 error passes
    if within 1e-5 + 4 x the model's own float32 noise (its float32 output against its float64 run),
    the rule ``fold`` uses. The verdict's tolerance and note say which limit was used."""
    from normsurgeon.graph.inputs import call, first_dtype, map_input
    from normsurgeon.graph.verify import output_error

    if first_dtype(x) != torch.float32:
        return ver32
    try:
        m64, n64 = copy.deepcopy(model).double().eval(), copy.deepcopy(new).double().eval()
        x64 = map_input(x, torch.Tensor.double)
        with torch.no_grad():
            ref64 = call(m64, x64)
            err64 = output_error(ref64, call(n64, x64))[1]
            noise = output_error(ref64, call(model.eval(), x))[1]
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps the float32 verdict
        return ver32
    if not err64 <= 1e-9:
        return ver32
    ver32.tolerance = FROZEN_TOLERANCE + 4 * noise
    ver32.note = (f"float32 error {ver32.max_rel_error:.1e} is rounding amplified by the network (its own float32 "
                  f"output is off its float64 run by {noise:.1e}); exact in float64 ({err64:.1e})")
    return ver32


def _recipe_for(name: str, recipe: Recipe, overrides: dict[str, Recipe]) -> Recipe:
    for pat, r in overrides.items():
        if matches(name, [pat]):
            return r
    return recipe


def _build(name: str, bn: nn.Module, recipe: Recipe, use: ModuleUse | None, producer, producer_name):
    entry = get_entry(recipe.name)
    ctx = BuildContext(
        name=name, bn=bn, input_shape=use.input_shape if use else None,
        producer=producer, producer_name=producer_name, recipe=recipe,
    )
    if ctx.input_shape is None:
        ctx.notes.append("not reached by the probe input: groups chosen from channels alone")
    try:
        rep = entry.build(ctx)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, NormSurgeonError):
            raise
        return None, ctx, str(e)
    return rep, ctx, None


def _wrap(bn: nn.Module, norm: nn.Module, post: nn.Module | None = None) -> tuple[nn.Module, str]:
    drop, act = bn_extras(bn)
    if drop is None and act is None and post is None:
        return norm, ""
    kept = [f"{k} {type(m).__name__}" for k, m in (("drop", drop), ("act", act)) if m is not None]
    return NormAct(norm, drop, act, post), ("kept " + ", ".join(kept) if kept else "")


def _apply(root: nn.Module, name: str, bn: nn.Module, rep, ctx, producer, producer_name, activation,
           changes: list[Change], trailing_notes: tuple[str, ...] = ()) -> None:
    """Put ``rep`` in place of BN ``name`` (and its producer), on either path.

    ``activation()`` finds the activation consuming the norm: ``(module, insert)`` where
    ``insert(post)`` puts ``post`` after it and returns its label, or None when there is none.
    """
    notes = ctx.notes  # after_activation builders may still add notes
    post = None
    _, fused_act = bn_extras(bn)
    if rep.after_activation is not None:
        if fused_act is not None:
            post = rep.after_activation(fused_act)
        elif (site := activation()) is None:
            post = rep.after_activation(None)
        else:
            act_mod, insert = site
            post_mod = rep.after_activation(act_mod)
            if post_mod is not None:
                notes.append(f"{type(post_mod).__name__} inserted after {insert(post_mod)}")
    new_mod, extra_note = _wrap(bn, rep.norm, post)
    if extra_note:
        notes.append(extra_note)
    notes.extend(trailing_notes)
    set_submodule(root, name, new_mod)
    if rep.producer is not None and producer_name:
        set_submodule(root, producer_name, rep.producer)
        changes.append(Change(producer_name, "standardized", describe(producer), describe(rep.producer),
                              f"feeds {name}"))
    changes.append(Change(name, "replaced", describe(bn), describe(rep.norm), "; ".join(notes)))


# --------------------------------------------------------------------------------------- fx path

def _convert_fx(gm: fx.GraphModule, recipe, overrides, keep, uses, changes) -> None:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batchnorm(modules.get(node.target)):
            continue
        name, bn = node.target, modules[node.target]
        if matches(name, keep):
            changes.append(Change(name, "kept", describe(bn), describe(bn), "matches --keep"))
            continue
        r = _recipe_for(name, recipe, overrides)
        src = node.args[0] if node.args else None
        producer = producer_name = None
        if isinstance(src, fx.Node) and src.op == "call_module":
            producer_name, producer = src.target, modules.get(src.target)
        rep, ctx, err = _build(name, bn, r, uses.get(name), producer, producer_name)
        if rep is None:
            changes.append(Change(name, "skipped", describe(bn), describe(bn), err))
            continue

        def activation(node=node, name=name):
            act_node, act_mod = _activation_after(node, modules)
            if act_node is None:
                return None

            def insert(post_mod):
                post_name = f"{name.replace('.', '_')}_post"
                gm.add_submodule(post_name, post_mod)
                _insert_after(gm, act_node, post_name)
                return act_node.name

            return act_mod, insert

        _apply(gm, name, bn, rep, ctx, producer, producer_name, activation, changes)
        modules = dict(gm.named_modules())
    gm.graph.lint()
    gm.recompile()


def _activation_after(node: fx.Node, modules: dict[str, nn.Module]):
    """The activation node consuming ``node`` (sole user), as (node, equivalent module) or (None, None)."""
    users = list(node.users)
    while len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), nn.Identity):
        users = list(users[0].users)  # timm blocks put Identity placeholders (drop_block, aa) in between
    if len(users) != 1:
        return None, None
    u = users[0]
    if u.op == "call_module" and isinstance(modules.get(u.target), ACTIVATION_TYPES):
        return u, modules[u.target]
    if u.op == "call_function" and u.target in ACTIVATION_FUNCTIONS:
        return u, ACTIVATION_FUNCTIONS[u.target]()
    if u.op == "call_method" and u.target in ACTIVATION_METHODS:
        return u, ACTIVATION_METHODS[u.target]()
    return None, None


def _insert_after(gm: fx.GraphModule, node: fx.Node, target: str) -> None:
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def _materialize_functional_bn(gm: fx.GraphModule, changes: list[Change]) -> None:
    """Turn ``F.batch_norm(x, <buffer>, <buffer>, <param>, <param>, ...)`` calls into BN modules
    (pytorch#122070: functional BN is otherwise invisible to module-level passes)."""
    for node in list(gm.graph.nodes):
        if not is_functional_bn(node):
            continue
        f, reason = read_functional_bn(gm, node)
        if f is None:
            if reason:
                changes.append(Change(node.name, "skipped", "F.batch_norm", "", reason))
            continue
        rm, rv, w, b = f.running_mean, f.running_var, f.weight, f.bias
        if rm is None or rv is None or not isinstance(f.training, bool):
            changes.append(Change(node.name, "skipped", "F.batch_norm", "",
                                  "functional batch_norm without running statistics (batch statistics only)"))
            continue
        c = rm.numel()
        bn = MaterializedBatchNorm(c, eps=f.eps, momentum=f.momentum, affine=w is not None)
        with torch.no_grad():
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
            if w is not None:
                bn.weight.copy_(w)
                bn.bias.copy_(b if b is not None else torch.zeros_like(w))
        bn = bn.to(rm.device)
        target = f"functional_bn_{node.name}"
        gm.add_submodule(target, bn)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (f.input,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changes.append(Change(target, "materialized", "F.batch_norm", describe(bn),
                              f"functional call {node.name} turned into a module"))


def _describe_cause(e: BaseException) -> str:
    cause = e.__cause__ or e
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0][:200] if lines else ''}"


def _report_untraced_bn(model: nn.Module, gm: fx.GraphModule, changes: list[Change]) -> None:
    """BN modules the traced graph never calls (e.g. inception_v3's training-only AuxLogits) are not
    part of the fx result: report each one rather than let it vanish silently."""
    present = dict(gm.named_modules())
    for name, m in model.named_modules():
        if is_batchnorm(m) and name not in present:
            changes.append(Change(name, "removed", describe(m), "-",
                                  "not called by the model traced in eval mode (e.g. a training-only branch): "
                                  "torch.fx left it out of the converted model"))


class MaterializedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN made from a functional ``F.batch_norm`` call: like the function, it accepts any input rank >= 2
    (``BatchNorm1d`` would reject the 4-D input of a materialized conv-net call when it is kept)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


# ------------------------------------------------------------------------------- module-swap path

def _convert_swap(model: nn.Module, recipe, overrides, keep, uses, changes) -> None:
    modules = dict(model.named_modules())
    bn_names = [n for n, m in modules.items() if is_batchnorm(m)]
    nested = {n for n in bn_names for p in bn_names if n != p and n.startswith(p + ".")}
    for name in bn_names:
        if name in nested:
            continue
        bn = modules[name]
        if matches(name, keep):
            changes.append(Change(name, "kept", describe(bn), describe(bn), "matches --keep"))
            continue
        use = uses.get(name)
        r = _recipe_for(name, recipe, overrides)
        producer_name = use.producer if use else None
        producer = modules.get(producer_name) if producer_name else None
        rep, ctx, err = _build(name, bn, r, use, producer, producer_name)
        if rep is None:
            changes.append(Change(name, "skipped", describe(bn), describe(bn), err))
            continue

        def activation(use=use):
            act_name = _sole_activation_consumer(use, modules, uses)
            if act_name is None:
                ctx.notes.append("no single-use activation module after it: nothing inserted after the activation")
                return None

            def insert(post_mod):
                set_submodule(model, act_name, nn.Sequential(modules[act_name], post_mod))
                return act_name

            return modules[act_name], insert

        _apply(model, name, bn, rep, ctx, producer, producer_name, activation, changes,
               () if use is not None else ("not called on the probe input",))


def _sole_activation_consumer(use: ModuleUse | None, modules, uses) -> str | None:
    consumers = [c for c in use.consumers if not isinstance(modules.get(c), nn.Identity)] if use else []
    if len(consumers) != 1:
        return None
    name = consumers[0]
    act_use = uses.get(name)
    if isinstance(modules.get(name), ACTIVATION_TYPES) and act_use is not None and act_use.calls == 1:
        return name
    return None
