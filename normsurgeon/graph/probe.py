"""Running a model once on a probe input to learn shapes and who feeds whom.

Works on any module (traceable or not): forward hooks record each leaf module's output tensor and
each module's input, and tensor identity links producers to consumers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normsurgeon.errors import ModelSpecError, ProbeError


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else "no message"


def default_input_shape(model: nn.Module, batch: int = 2) -> tuple[int, ...]:
    """The model's own input size (timm's pretrained_cfg), else a guess from its first layer."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (batch, *cfg["input_size"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (batch, m.in_channels, 224, 224)
        if isinstance(m, nn.Conv1d):
            return (batch, m.in_channels, 128)
        if isinstance(m, nn.Conv3d):
            return (batch, m.in_channels, 16, 64, 64)
        if isinstance(m, nn.Linear):
            return (batch, m.in_features)
        if isinstance(m, nn.Embedding):
            raise ModelSpecError("the model starts with an embedding; pass --input-shape explicitly")
    raise ModelSpecError("cannot guess the model's input shape; pass --input-shape N,C,H,W")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        dims = tuple(int(t) for t in str(text).replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise ModelSpecError(f"bad --input-shape {text!r}: write integers like 1,3,224,224") from None
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ModelSpecError(f"bad --input-shape {text!r}: need at least N,C with positive sizes")
    return dims


def probe_input(model: nn.Module, shape: tuple[int, ...] | None = None, seed: int = 0) -> torch.Tensor:
    shape = shape or default_input_shape(model)
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


@dataclass
class ModuleUse:
    input_shape: tuple[int, ...] | None = None
    producer: str | None = None  # name of the leaf module whose output is this module's input
    consumers: list[str] = field(default_factory=list)
    calls: int = 0


def observe(model: nn.Module, x: torch.Tensor, watch: type | tuple[type, ...]) -> dict[str, ModuleUse]:
    """Run ``model(x)`` in eval mode, without grad, and record for each module of type ``watch``
    its input shape, producing leaf module and consuming modules. The model is left unchanged."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    uses: dict[str, ModuleUse] = {}
    watched_out: dict[int, str] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def first_tensor(args):
        for a in args:
            if isinstance(a, torch.Tensor):
                return a
        return None

    def pre(mod, args):
        name = names.get(mod)
        t = first_tensor(args)
        if t is None or name is None:
            return
        src = watched_out.get(id(t))
        if src is not None and src != name and name not in uses[src].consumers:
            uses[src].consumers.append(name)
        if isinstance(mod, watch):
            u = uses.setdefault(name, ModuleUse())
            u.calls += 1
            u.input_shape = tuple(t.shape)
            prod = produced.get(id(t))
            u.producer = prod[0] if prod else None

    def post(mod, args, out):
        name = names.get(mod)
        if isinstance(out, torch.Tensor) and name is not None:
            if isinstance(mod, watch):
                uses.setdefault(name, ModuleUse())
                watched_out[id(out)] = name
            if not list(mod.children()) or isinstance(mod, watch):
                produced[id(out)] = (name, out)  # keep the tensor alive: ids stay unique

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                model(x)
            except Exception as e:  # noqa: BLE001 - the model rejects the probe: a user-fixable input problem
                raise ProbeError(
                    f"the model fails on a probe input of shape {','.join(map(str, x.shape))} "
                    f"({type(e).__name__}: {_first_line(e)}); pass --input-shape with the shape it expects "
                    "(models taking several inputs are not supported)"
                ) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # consumers of a watched module: only leaf modules (or watched ones), not enclosing containers
    leafish = {n for n, m in model.named_modules() if not list(m.children()) or isinstance(m, watch)}
    for u in uses.values():
        u.consumers = [c for c in u.consumers if c in leafish]
    return uses
