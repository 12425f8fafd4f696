"""Example inputs: what a model is called with when a single random probe tensor will not do.

``example_inputs=`` (a tensor, a tuple/list of tensors, or a dict of tensors) becomes an
:class:`Inputs` (positional args + keyword args). Every verb runs the model through :func:`call`,
which also takes the older probe forms (one tensor, or a list of images for detection models).
Casts (float64 rechecks, requires_grad) go through :func:`map_input`, which touches floating
tensors only: integer token ids and boolean masks stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from normsurgeon.errors import ModelSpecError


@dataclass(frozen=True)
class Inputs:
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) for every input: ``input_0``.. for positional ones, the key for keywords."""
        return [(f"input_{i}", t) for i, t in enumerate(self.args)] + list(self.kwargs.items())

    @property
    def shape(self) -> tuple[int, ...]:
        """The first input's shape (its first axis is the batch)."""
        return tuple(self.named()[0][1].shape)

    @property
    def batch(self) -> int:
        return self.shape[0] if self.shape else 1

    def describe(self) -> str:
        return ", ".join(f"{n} {'x'.join(map(str, t.shape))} {str(t.dtype).replace('torch.', '')}"
                         for n, t in self.named())

    def map(self, fn) -> Inputs:
        return Inputs(tuple(fn(t) for t in self.args), {k: fn(t) for k, t in self.kwargs.items()})


def from_example(example, model: nn.Module | None = None) -> Inputs:
    """``example`` as :class:`Inputs`; floating tensors are moved to the model's dtype and device,
    others (token ids, masks) only to its device. Anything but tensors is a ModelSpecError."""
    if isinstance(example, Inputs):
        inputs = example
    elif isinstance(example, torch.Tensor):
        inputs = Inputs((example,))
    elif isinstance(example, (tuple, list)):
        inputs = Inputs(tuple(example))
    elif isinstance(example, dict):
        inputs = Inputs((), dict(example))
    else:
        raise ModelSpecError(f"example_inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
                             f"not {type(example).__name__}")
    bad = [n for n, t in inputs.named() if not isinstance(t, torch.Tensor)]
    if not inputs.named() or bad:
        raise ModelSpecError("example_inputs must hold at least one tensor and only tensors"
                             + (f" ({', '.join(bad)} is not one)" if bad else ""))
    if any(not str(k).isidentifier() for k in inputs.kwargs):
        raise ModelSpecError("example_inputs dict keys must be the forward's argument names")
    p = next(iter(model.parameters()), None) if model is not None else None
    if p is None:
        return inputs
    dtype = p.dtype if p.is_floating_point() else None
    return inputs.map(lambda t: t.detach().to(device=p.device, dtype=dtype if t.is_floating_point() and dtype
                                              else t.dtype))


def resolve(model: nn.Module, input_shape=None, example_inputs=None, batch: int = 2):
    """``(x, shape_from)``: the example inputs (``shape_from`` = "example inputs") or, as before, a
    seeded random tensor of ``input_shape`` (given, recorded, or guessed). Both at once: ModelSpecError."""
    from normsurgeon.graph.probe import input_shape_and_source, probe_input

    if example_inputs is not None:
        if input_shape:
            raise ModelSpecError("give either input_shape or example_inputs, not both")
        return from_example(example_inputs, model), "example inputs"
    shape, shape_from = input_shape_and_source(model, input_shape, batch)
    return probe_input(model, shape), shape_from


def call(model, x):
    """Run ``model`` on ``x``: example inputs as ``model(*args, **kwargs)``, anything else as ``model(x)``."""
    if isinstance(x, Inputs):
        return model(*x.args, **x.kwargs)
    return model(x)


def map_input(x, fn):
    """``fn`` applied to the probe: a tensor, each image of a list (detection models), or each
    floating tensor of example inputs (integer and boolean ones are left as they are)."""
    if isinstance(x, Inputs):
        return x.map(lambda t: fn(t) if t.is_floating_point() else t)
    if isinstance(x, (list, tuple)):
        return [fn(t) for t in x]
    return fn(x)


def input_shape_of(x) -> tuple[int, ...]:
    """The probe's shape as N,C,... (a list of same-sized images counts as a batch; example inputs
    give their first input's shape)."""
    if isinstance(x, Inputs):
        return x.shape
    if isinstance(x, (list, tuple)):
        return (len(x), *x[0].shape)
    return tuple(x.shape)


def first_dtype(x) -> torch.dtype:
    """The dtype of the probe's first floating tensor (float32 when it has none)."""
    if isinstance(x, Inputs):
        return next((t.dtype for _, t in x.named() if t.is_floating_point()), torch.float32)
    return (x[0] if isinstance(x, (list, tuple)) else x).dtype


def positional(gm, x) -> tuple:
    """``x`` as positional arguments of a GraphModule (an fx Interpreter takes no keywords):
    keyword inputs go to the placeholder of their name."""
    if not isinstance(x, Inputs):
        return (x,)
    if not x.kwargs:
        return x.args
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    out = list(x.args)
    for name in names[len(x.args):]:
        if name not in x.kwargs:
            break
        out.append(x.kwargs[name])
    return tuple(out)


def supplied_names(model, x) -> list[str]:
    """The forward's parameter names that example inputs ``x`` give a value to."""
    if not isinstance(x, Inputs):
        return []
    import inspect

    try:
        return list(inspect.signature(model.forward).bind_partial(*x.args, **x.kwargs).arguments)
    except (TypeError, ValueError):
        return []


def describe(x) -> str:
    """The probe for messages: example inputs by name, shape and dtype; a tensor by its shape."""
    if isinstance(x, Inputs):
        return f"the example inputs ({x.describe()})"
    return f"a probe input of shape {','.join(map(str, input_shape_of(x)))}"


def perturb_others(x, generator: torch.Generator):
    """``x`` with every sample but the first replaced (batch-independence check): floating tensors get
    fresh noise; integer/boolean ones get values drawn from the same tensor (valid token ids stay
    valid). Tensors whose first axis is not the batch are left alone."""
    def other(t: torch.Tensor, n: int) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != n or n < 2:
            return t
        t = t.clone()
        if t.is_floating_point():
            noise = torch.randn(t[1:].shape, generator=generator, dtype=torch.float32)
            t[1:] = (noise * 3.0 + 1.0).to(dtype=t.dtype, device=t.device)
            return t
        pool = t.flatten()
        idx = torch.randint(0, pool.numel(), t[1:].shape, generator=generator).to(t.device)
        t[1:] = pool[idx.flatten()].reshape(t[1:].shape)
        if torch.equal(t[1:], pool.reshape(t.shape)[1:]):  # a constant tensor: shift samples instead
            t[1:] = t.roll(1, 0)[1:]
        return t

    n = x.batch
    return x.map(lambda t: other(t, n))
