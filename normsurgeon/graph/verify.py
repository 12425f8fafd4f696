"""Checking a rewrite numerically: output error on a probe input, and batch independence."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from normsurgeon.graph.inputs import Inputs, call, perturb_others
from normsurgeon.report import Verification


NUMERICALLY_ZERO = 1e-10  # below this an output on a unit-scale probe is rounding noise, not a signal


def flatten_outputs(out) -> list[torch.Tensor]:
    """All floating tensors in a model output (tensor, tuple/list, dict, namedtuple), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def output_error(ref_outputs, new_outputs) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) over all output tensors; inf when the outputs differ
    in number or shape, or when either holds a NaN/inf the other does not (NaN never compares small)."""
    refs, news = flatten_outputs(ref_outputs), flatten_outputs(new_outputs)
    if len(refs) != len(news):
        return float("inf"), float("inf")
    max_abs, max_rel = 0.0, 0.0
    for r, n in zip(refs, news):
        if r.shape != n.shape:
            return float("inf"), float("inf")
        if not r.numel():
            continue
        r64, n64 = r.detach().double(), n.detach().double()
        if not (torch.isfinite(r64).all() and torch.isfinite(n64).all()):
            return float("inf"), float("inf")
        err = (r64 - n64).abs().max().item()
        scale = r64.abs().max().item()
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    return max_abs, max_rel


def uninformative(tensors: list[torch.Tensor]) -> str | None:
    """Why comparing these reference tensors would prove nothing (None: they are fine to compare):
    no tensor, all empty, all zero or below ``NUMERICALLY_ZERO``, all constant, or any NaN/inf."""
    if not tensors:
        return "has no floating-point tensor"
    if any(not torch.isfinite(t).all() for t in tensors if t.numel()):
        return "is not finite (NaN or inf)"
    full = [t for t in tensors if t.numel()]
    if not full:
        return "is empty (" + ", ".join("x".join(map(str, t.shape)) for t in tensors[:3]) + ")"
    peak = max(t.detach().double().abs().max().item() for t in full)
    if peak == 0:
        return "is all zero"
    if peak < NUMERICALLY_ZERO:  # e.g. timm lcnetv2_small at random init: |output| ~ 6e-13 on an N(0, 1) probe
        return f"is numerically zero (max |value| {peak:.1e})"
    if all((t.max() - t.min()).item() == 0 for t in full):
        return "is constant"
    return None


def _leaf_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.state_dict())


def _unchanged_leaves(original: nn.Module, rewritten: nn.Module) -> list[str]:
    """Leaf modules present under the same name in both models, of the same type, with equal state:
    given the same input they give the same output, so their outputs are comparable feature maps."""
    new_mods = dict(rewritten.named_modules())
    out = []
    for name, m in original.named_modules():
        n = new_mods.get(name)
        if not name or n is None or type(n) is not type(m) or any(True for _ in m.children()) \
                or any(True for _ in n.children()):
            continue
        a, b = _leaf_state(m), _leaf_state(n)
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].device))
                                       for k in a):
            continue
        out.append(name)
    return out


def _run_hooked(model: nn.Module, x, names: list[str], keep: tuple[str, int] | None = None):
    """Run ``model(x)``; with ``keep=None`` return (output, [(name, call) in call order whose output is
    informative]); with ``keep=(name, call)`` return (output, that call's floating output tensors)."""
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    found: list[tuple[str, int]] = []
    kept: list[torch.Tensor] = []
    handles = []

    def hook(name):
        def fn(mod, args, out):
            k = calls.get(name, 0)
            calls[name] = k + 1
            if keep is None:
                t = flatten_outputs(out)
                if t and uninformative(t) is None:
                    found.append((name, k))
            elif keep == (name, k):
                kept.extend(t.detach().clone() for t in flatten_outputs(out))
        return fn

    for n in names:
        if n in mods:
            handles.append(mods[n].register_forward_hook(hook(n)))
    try:
        out = call(model, x)
    finally:
        for h in handles:
            h.remove()
    return out, (found if keep is None else kept)


@torch.no_grad()
def compare(original: nn.Module, rewritten: nn.Module, x, tolerance: float | None) -> Verification:
    """Eval-mode outputs of both models on ``x``; the models' train/eval state is restored.

    Never vacuous: when the reference output is empty, constant or all zero (a random-init detector
    keeps no box), the deepest feature map that is informative is compared instead (the last call of a
    leaf module both models hold unchanged), and ``compared`` says where. A NaN/inf reference, or no
    informative feature map at all, sets ``problem`` ("cannot verify: ..."), which fails the check."""
    states = (original.training, rewritten.training)
    original.eval(), rewritten.eval()
    try:
        ref, new = call(original, x), call(rewritten, x)
        why = uninformative(flatten_outputs(ref))
        if why is None:
            abs_err, rel_err = output_error(ref, new)
            problem = None
            if not math.isfinite(abs_err):
                problem = ("the rewritten model's output is not finite (NaN or inf) where the original's is"
                           if _same_structure(ref, new) else "the rewritten model's outputs differ in number or shape")
            return Verification(max_abs_error=abs_err, max_rel_error=rel_err, tolerance=tolerance,
                                problem=problem)
        if why.startswith("is not finite"):
            return Verification(float("nan"), float("nan"), tolerance=tolerance,
                                problem=f"cannot verify: the original model's output {why}; check its weights "
                                        "and running statistics (a negative running_var gives NaN)")
        names = _unchanged_leaves(original, rewritten)
        _, found = _run_hooked(original, x, names)
        for site in reversed(found):
            _, r = _run_hooked(original, x, names, keep=site)
            _, n = _run_hooked(rewritten, x, names, keep=site)
            if not n:
                continue
            abs_err, rel_err = output_error(r, n)
            where = f"features at {site[0]}" + (f" (call {site[1] + 1})" if site[1] else "")
            return Verification(max_abs_error=abs_err, max_rel_error=rel_err, tolerance=tolerance,
                                compared=where, note=f"the model's output {why}: compared {where} instead")
        return Verification(float("nan"), float("nan"), tolerance=tolerance, compared="nothing",
                            problem=f"cannot verify: the model's output {why} and no intermediate feature map "
                                    "both models share is informative; try another --input-shape")
    finally:
        original.train(states[0]), rewritten.train(states[1])


def _same_structure(a, b) -> bool:
    fa, fb = flatten_outputs(a), flatten_outputs(b)
    return len(fa) == len(fb) and all(x.shape == y.shape for x, y in zip(fa, fb))


def raise_if_unverifiable(ver: Verification, verb: str) -> None:
    """Under --verify: a check that could not be made is a failure (VerificationError, exit 3)."""
    from normsurgeon.errors import VerificationError

    if ver is not None and ver.problem is not None:
        raise VerificationError(f"{verb}: {ver.problem}")


def batch_independence_error(model: nn.Module, x, train: bool = False) -> float:
    """Max relative change of sample 0's output when the rest of the batch is replaced.

    In train mode the model is deep-copied first (running statistics must not move) and dropout is
    switched off, so only normalization can make samples interact.
    """
    m = copy.deepcopy(model) if train else model
    was = m.training
    m.train(train)
    if train:
        for mod in m.modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd) or type(mod).__name__ in ("DropPath",):
                mod.eval()
    try:
        with torch.no_grad():
            a = call(m, x)
            g = torch.Generator().manual_seed(1234)  # deterministic: the same verdict on every run
            if isinstance(x, Inputs):  # integer inputs (token ids) get other samples' values, not noise
                other = perturb_others(x, g)
            elif isinstance(x, (list, tuple)):  # a list of images (detection): replace all but the first
                other = [x[0]] + [(torch.randn(t.shape, generator=g) * 3.0 + 1.0).to(t) for t in x[1:]]
            else:
                other = x.clone()
                noise = torch.randn(other[1:].shape, generator=g, dtype=torch.float32)
                other[1:] = (noise * 3.0 + 1.0).to(dtype=other.dtype, device=other.device)
            b = call(m, other)
    finally:
        m.train(was)
    return output_error(_sample0(a), _sample0(b))[1]


def _sample0(out) -> list[torch.Tensor]:
    """Sample 0's part of a batch output: a per-image list of dicts (detection) gives its first
    element; tensors give their first row."""
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, dict) for o in out):
        return flatten_outputs(out[0])
    return [t[:1] for t in flatten_outputs(out)]
