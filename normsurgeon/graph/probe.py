"""Running a model once on a probe input to learn shapes and who feeds whom.

Works on any module (traceable or not): forward hooks record each leaf module's output tensor and
each module's input, and tensor identity links producers to consumers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normsurgeon.errors import ModelSpecError, ProbeError
from normsurgeon.graph.inputs import Inputs, call, describe, input_shape_of, map_input  # noqa: F401 - re-exported


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else "no message"


def input_shape_and_source(model: nn.Module, shape=None, batch: int = 2) -> tuple[tuple[int, ...], str]:
    """The input shape to run ``model`` on, and where it came from: ``given``; ``recorded`` (the
    shape an earlier verb used, stored in the model's file; its batch size is replaced by ``batch``);
    ``model config`` (timm's pretrained_cfg); or ``guessed from the first layer``."""
    if shape:
        return tuple(int(d) for d in shape), "given"
    from normsurgeon import provenance

    recorded = provenance.input_shape(model)
    if recorded:
        return (batch, *recorded[1:]), "recorded"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (batch, *cfg["input_size"]), "model config"
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (batch, m.in_channels, 224, 224), "guessed from the first layer"
        if isinstance(m, nn.Conv1d):
            return (batch, m.in_channels, 128), "guessed from the first layer"
        if isinstance(m, nn.Conv3d):
            return (batch, m.in_channels, 16, 64, 64), "guessed from the first layer"
        if isinstance(m, nn.Linear):
            return (batch, m.in_features), "guessed from the first layer"
        if isinstance(m, nn.Embedding):
            raise ModelSpecError("the model starts with an embedding; pass --input-shape explicitly")
    raise ModelSpecError("cannot guess the model's input shape; pass --input-shape N,C,H,W")


def default_input_shape(model: nn.Module, batch: int = 2) -> tuple[int, ...]:
    """The shape recorded with the model, its own config's (timm), else a guess from its first layer."""
    return input_shape_and_source(model, None, batch)[0]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    from normsurgeon.preflight import shape

    return shape(text)


MEMORY_CHECK_BYTES = 64 * 2**20  # inputs above this size get an activation-memory estimate first


def probe_input(model: nn.Module, shape: tuple[int, ...] | None = None, seed: int = 0) -> torch.Tensor:
    """A seeded random input of ``shape`` (default: :func:`default_input_shape`) in the model's dtype
    and device. A large input whose activations would not fit in memory is refused first
    (:func:`normsurgeon.graph.memory.check_fits`)."""
    shape = shape or default_input_shape(model)
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    if torch.Size(shape).numel() * 4 > MEMORY_CHECK_BYTES and torch.device(device).type == "cpu":
        from normsurgeon.graph.memory import check_fits

        check_fits(model, tuple(shape), dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def first_layer_hint(model: nn.Module) -> str:
    """What input the model's first layer takes, as --input-shape examples (for error messages)."""
    for name, m in model.named_modules():
        where = f"its first layer {name or type(model).__name__} ({type(m).__name__}"
        if isinstance(m, nn.Conv1d):
            hint = f"{where}, {m.in_channels} channels) suggests N,C,L, e.g. --input-shape 2,{m.in_channels},128"
            if m.in_channels == 1:  # raw-audio models often add the channel axis themselves
                hint += ", or N,L (e.g. --input-shape 2,16000) if the model adds the channel axis itself"
            return hint
        if isinstance(m, nn.Conv2d):
            return f"{where}, {m.in_channels} channels) suggests N,C,H,W, e.g. --input-shape 2,{m.in_channels},64,64"
        if isinstance(m, nn.Conv3d):
            return (f"{where}, {m.in_channels} channels) suggests N,C,D,H,W, e.g. "
                    f"--input-shape 2,{m.in_channels},16,32,32")
        if isinstance(m, nn.Linear):
            return (f"{where}, {m.in_features} features) suggests N,F or N,L,F, e.g. --input-shape 2,{m.in_features}")
        if isinstance(m, nn.Embedding):
            return f"{where}) takes integer token ids, which normsurgeon's random probe cannot supply"
    return "no conv or linear layer says what it takes"


def run_probe(model: nn.Module, x):
    """Run ``model`` once in eval mode on the probe ``x`` (no grad; train/eval state restored).

    Returns ``(x, output)``. A batch tensor the model rejects is retried as a list of images
    (torchvision detection models take a list). If neither runs, the input shape is wrong for this
    model: ProbeError (a user error), saying what the first layer suggests."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                return x, call(model, x)
            except Exception as e:  # noqa: BLE001 - decided below: retry as a list, else the user's shape
                first = e
            if isinstance(x, torch.Tensor) and x.dim() >= 3:
                images = list(x.unbind(0))
                try:
                    return images, model(images)
                except Exception:  # noqa: BLE001 - report the tensor attempt's error
                    pass
    finally:
        model.train(was)
    raise ProbeError(_fails(model, x, first)) from first


def _fails(model: nn.Module, x, e: BaseException) -> str:
    if isinstance(x, Inputs):
        return (f"the model fails on {describe(x)} ({type(e).__name__}: {_first_line(e)}); pass "
                "example_inputs the way its forward takes them (a tuple in argument order, or a dict by name)")
    return (f"the model fails on {describe(x)} ({type(e).__name__}: {_first_line(e)}); {first_layer_hint(model)}; "
            "pass --input-shape with the shape it expects (or, from Python, example_inputs= for models taking "
            "several or integer inputs)")


@dataclass
class ModuleUse:
    input_shape: tuple[int, ...] | None = None
    producer: str | None = None  # name of the leaf module whose output is this module's input
    consumers: list[str] = field(default_factory=list)
    calls: int = 0


def observe(model: nn.Module, x, watch: type | tuple[type, ...]) -> dict[str, ModuleUse]:
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
                call(model, x)
            except Exception as e:  # noqa: BLE001 - the model rejects the probe: a user-fixable input problem
                raise ProbeError(_fails(model, x, e)) from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # consumers of a watched module: only leaf modules (or watched ones), not enclosing containers
    leafish = {n for n, m in model.named_modules() if not list(m.children()) or isinstance(m, watch)}
    for u in uses.values():
        u.consumers = [c for c in u.consumers if c in leafish]
    return uses
