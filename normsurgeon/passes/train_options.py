"""Convert options for training from scratch ("Revisiting Batch Normalization", Davis & Frank,
ECCV 2022; osu-cvl/revisiting-bn ``batch_norm.py``/``networks.py``):

- ``init="revisited"``: every normalization layer's scale gamma = 0.1 and shift beta = 0 (instead
  of 1 and 0); proxy-norm's own gamma~/beta~ are left at their init. Train the scales at lr/100 with
  :func:`normsurgeon.training.revisited_param_groups`.
- ``input_norm=True`` (or ``"bn"``): prepend the online BN-based input normalization
  (:class:`normsurgeon.layers.InputNorm`, gamma 0.058, beta frozen at 0) before the first layer.
  ``input_norm="dain"``: prepend Deep Adaptive Input Normalization (:class:`normsurgeon.layers.DAIN`,
  Passalis et al. 2019) instead, for (N, C, L) sequence inputs.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from normsurgeon.errors import RecipeError
from normsurgeon.preflight import INIT_CHOICES, INPUT_NORM_CHOICES, check_init, input_norm_kind  # noqa: F401
from normsurgeon.graph.modules import matches, set_submodule
from normsurgeon.report import Change

REVISITED_GAMMA = 0.1  # revisiting-bn: bn_weight = 0.1
INPUT_NORM_NAME = "input_norm"


def _norm_with_scale(m: nn.Module) -> bool:
    """torch's norms and every norm layer a registered recipe declares, when they carry a scale."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    from normsurgeon.recipes.registry import layer_classes

    types = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm) + layer_classes(norm=True)
    return isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)


def apply_init(model: nn.Module, init: str | None, changes: list[Change], keep=()) -> None:
    """Re-initialize every normalization layer's affine (gamma 0.1, beta 0) for ``revisited``.

    Layers matching ``keep`` (convert's ``--keep``) and frozen BN layers (fixed buffers, which
    training could never move back) are left alone; frozen ones are reported as skipped."""
    from normsurgeon.layers import FrozenBatchNorm

    check_init(init)
    if init is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, FrozenBatchNorm):
            changes.append(Change(name, "skipped", type(m).__name__, type(m).__name__,
                                  f"--init {init} not applied: frozen, its affine is a fixed buffer training cannot move"))
            continue
        if not _norm_with_scale(m) or matches(name, keep):  # kept layers are already reported as kept
            continue
        with torch.no_grad():
            m.weight.fill_(REVISITED_GAMMA)
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.zero_()
        changes.append(Change(name, "initialized", type(m).__name__, type(m).__name__,
                              f"revisited init: weight {REVISITED_GAMMA}, bias 0"))


def prepend_input_norm(model: nn.Module, x: torch.Tensor, changes: list[Change], kind: str = "bn") -> None:
    """Put an InputNorm (``kind="bn"``) or a DAIN (``"dain"``, (N, C, L) inputs only) over the model
    input's channels before the first layer (in place)."""
    from normsurgeon.layers.dain import DAIN
    from normsurgeon.layers.input_norm import InputNorm

    like = x
    if kind == "dain" and x.dim() != 3:
        raise RecipeError(f"--input-norm dain needs (N, C, L) sequence inputs; the model input is "
                          f"{tuple(x.shape)}: give --input-shape N,C,L or use --input-norm bn")
    cls = DAIN if kind == "dain" else InputNorm
    norm = cls(x.shape[1]).to(device=like.device, dtype=like.dtype)
    label, what = f"{cls.__name__}({x.shape[1]})", ("adaptive input normalization (DAIN)" if kind == "dain"
                                                      else "online input normalization")
    if isinstance(model, fx.GraphModule):
        placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
        if not placeholders:
            changes.append(Change("<input>", "skipped", "", "", "no input placeholder to normalize"))
            return
        first = placeholders[0]
        model.add_submodule(INPUT_NORM_NAME, norm)
        with model.graph.inserting_after(placeholders[-1]):
            new = model.graph.call_module(INPUT_NORM_NAME, (first,))
        first.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        model.graph.lint()
        model.recompile()
        changes.append(Change(INPUT_NORM_NAME, "inserted", "", label, f"{what} before the first layer"))
        return
    name = _sole_input_consumer(model, x)
    if name is None:
        changes.append(Change("<input>", "skipped", "", "",
                              "no single module consumes the raw input: cannot prepend input normalization"))
        return
    inner = model.get_submodule(name)
    set_submodule(model, name, nn.Sequential(norm, inner))
    changes.append(Change(name, "inserted", type(inner).__name__, f"{label} + {type(inner).__name__}",
                          f"{what} before the first layer"))


def _sole_input_consumer(model: nn.Module, x: torch.Tensor) -> str | None:
    seen: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    leaves = {m for m in model.modules() if not list(m.children())}

    def pre(mod, args):
        if mod in leaves and args and args[0] is x and names.get(mod):
            seen.append(names[mod])

    handles = [m.register_forward_pre_hook(pre) for m in leaves]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return seen[0] if len(set(seen)) == 1 and len(seen) == 1 else None
