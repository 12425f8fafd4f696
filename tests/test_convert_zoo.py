"""Every torchvision classification model with BatchNorm, and a sample of timm models, converts to
``frozen`` and ``gn+ws``: no BN left, frozen exact, gamma/beta carried over, batch-independent
in eval and train mode. One test per model runs both recipes so each model is built once.

The BN-free torchvision models are found by building them on the meta device (cheap); a model whose
builder cannot run on meta (the regnets) is kept in the sweep, where the test asserts it has BN, so
no model is dropped silently.
"""
from __future__ import annotations

import functools
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon
from normsurgeon.graph.verify import batch_independence_error
from normsurgeon.layers.frozen_bn import FrozenBatchNorm
from normsurgeon.layers.norm_act import NormAct
from normsurgeon.layers.ws_conv import WSConv2d
from tests.util import randomize_norm_stats

BN = nn.modules.batchnorm._BatchNorm
# input sizes the architectures need (inception: >= 75 px; maxvit: windows of 7 at every stage)
INPUT = {"inception_v3": (2, 3, 75, 75), "maxvit_t": (2, 3, 224, 224)}
DEFAULT_INPUT = (2, 3, 32, 32)
HEAVY_FIRST = ("regnet_y_128gf", "regnet_y_32gf", "regnet_x_32gf", "efficientnet_v2_l")  # xdist: longest first


@functools.lru_cache(maxsize=None)
def torchvision_bn_models() -> tuple[str, ...]:
    import torchvision

    keep = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                m = torchvision.models.get_model(name, weights=None)
        except Exception:  # noqa: BLE001 - builder needs real tensors: decide in the test itself
            keep.append(name)
            continue
        if any(isinstance(x, BN) for x in m.modules()):
            keep.append(name)
    return tuple(sorted(keep, key=lambda n: (n not in HEAVY_FIRST, HEAVY_FIRST.index(n) if n in HEAVY_FIRST else 0, n)))


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BN)}


def run_and_record_calls(model: nn.Module, x: torch.Tensor):
    """(eval output, names of the modules the forward actually calls): forward hooks, independent of fx."""
    names = {m: n for n, m in model.named_modules()}
    seen: set[str] = set()
    hs = [m.register_forward_hook(lambda mod, i, o: seen.add(names[mod])) for m in model.modules()]
    try:
        with torch.no_grad():
            out = first(model.eval()(x))
    finally:
        for h in hs:
            h.remove()
    return out, seen


def first(out) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def eval_sample_leak(model: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    """How much sample 0's eval output (``out`` = model(x)) moves when the other samples change.
    Same batch size, so the same kernels run and a batch-independent model gives exactly 0."""
    other = x.clone()
    other[1:] = torch.randn_like(other[1:]) * 2 + 1
    with torch.no_grad():
        moved = first(model(other))
    return rel_err(moved[:1], out[:1])


def norm_of(module: nn.Module) -> nn.Module:
    return module.norm if isinstance(module, NormAct) else module


def check_both_recipes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, normsurgeon.SurgeryResult]:
    """The issue's properties for ``frozen`` and ``gn+ws`` on one model; returns the frozen result's report."""
    randomize_norm_stats(model)
    bns = bn_layers(model)
    assert bns, "model has no BatchNorm"
    affine = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in bns.items() if m.affine}
    x = torch.randn(shape)
    ref, called = run_and_record_calls(model, x)
    reports = {}

    # frozen: exactly BN's eval function
    r = normsurgeon.convert(model, "frozen", input_shape=shape)
    new = r.model.eval()
    assert not bn_layers(new), f"BatchNorm left: {list(bn_layers(new))[:3]}"
    with torch.no_grad():
        out = first(new(x))
    assert rel_err(out, ref) <= 1e-5  # exact => per-sample in eval, like BN's own eval function
    assert r.verification.batch_independent
    assert batch_independence_error(new, x, train=True) <= 1e-5
    replaced = {c.target for c in r.changes if c.action == "replaced"}
    removed = {c.target for c in r.changes if c.action == "removed"}
    assert replaced | removed == set(bns)
    assert not (removed & called), "a BN the model calls was removed"
    for name in replaced:
        assert isinstance(norm_of(new.get_submodule(name)), FrozenBatchNorm)
    reports["frozen"] = r
    del r, new, out
    gc.collect()

    # gn+ws: GroupNorm carrying gamma/beta, producing convs standardized
    r = normsurgeon.convert(model, "gn+ws", input_shape=shape)
    new = r.model.eval()
    assert not bn_layers(new)
    for name in {c.target for c in r.changes if c.action == "replaced"}:
        gn = norm_of(new.get_submodule(name))
        assert isinstance(gn, nn.GroupNorm), name
        if name in affine:
            torch.testing.assert_close(gn.weight.detach(), affine[name][0], rtol=0, atol=0)
            torch.testing.assert_close(gn.bias.detach(), affine[name][1], rtol=0, atol=0)
    std = [c.target for c in r.changes if c.action == "standardized"]
    assert std and all(type(new.get_submodule(n)).__name__.startswith("WSConv") for n in std)
    assert r.verification.batch_independent and r.info["batch_independence_error"] <= 1e-5
    assert torch.isfinite(torch.tensor(r.verification.max_abs_error))
    assert batch_independence_error(new, x, train=True) <= 1e-4
    reports["gn+ws"] = r
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_bn_models())
def test_torchvision_model_converts(name):
    model = normsurgeon.load_model(f"torchvision:{name}")
    reports = check_both_recipes(model, INPUT.get(name, DEFAULT_INPUT))
    assert reports["frozen"].path == "fx"  # every torchvision BN model traces with NormTracer


def test_sweep_covers_the_bn_families():
    """The meta-device enumeration keeps every family with BN and drops the BN-free ones."""
    names = set(torchvision_bn_models())
    for must in ("resnet50", "mobilenet_v3_small", "efficientnet_b7", "regnet_y_128gf", "inception_v3",
                 "googlenet", "densenet121", "vgg11_bn", "shufflenet_v2_x0_5", "mnasnet0_5", "maxvit_t"):
        assert must in names
    for bn_free in ("vit_b_16", "swin_t", "convnext_tiny", "vgg11", "alexnet", "squeezenet1_0"):
        assert bn_free not in names


def test_inception_aux_branch_removal_is_reported():
    """fx traces in eval mode, where inception_v3 never calls AuxLogits: its BNs must be reported."""
    model = normsurgeon.load_model("torchvision:inception_v3")
    r = normsurgeon.convert(model, "frozen", input_shape=INPUT["inception_v3"])
    removed = sorted(c.target for c in r.changes if c.action == "removed")
    assert removed and all(n.startswith("AuxLogits.") for n in removed)


# ------------------------------------------------------------------------------------------- timm

TIMM_SAMPLE = [
    ("efficientnet_b0", "fx"),  # BatchNormAct2d + SiLU
    ("lcnet_050", "fx"),  # BatchNormAct2d + Hardswish
    ("resnet10t", "fx"),  # plain BN
    ("mobilevit_xxs", "module-swap"),  # data-dependent control flow: torch.fx cannot trace it
]


@pytest.mark.parametrize("name,path", TIMM_SAMPLE)
def test_timm_model_converts(name, path):
    pytest.importorskip("timm")
    model = normsurgeon.load_model(f"timm:{name}")
    reports = check_both_recipes(model, (2, 3, 64, 64))
    for r in reports.values():
        assert r.path == path
        fallback = [c for c in r.changes if c.action == "fallback"]
        assert bool(fallback) == (path == "module-swap")
        if fallback:
            assert "cannot trace" in fallback[0].detail
    new, x = reports["gn+ws"].model.eval(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = first(new(x))
    assert eval_sample_leak(new, x, out) <= 1e-5  # an eval check independent of convert's own


def _by_hand_gn(model: nn.Module, groups: int) -> nn.Module:
    """Reference: each BN's forward replaced by hand with act(drop(group_norm(x))) using its own gamma/beta."""
    import copy

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, BN):
            def fwd(x, m=m):
                y = F.group_norm(x, groups, m.weight, m.bias, m.eps)
                for extra in ("drop", "act"):
                    if isinstance(getattr(m, extra, None), nn.Module):
                        y = getattr(m, extra)(y)
                return y
            m.forward = fwd
    return ref


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilevit_xxs"])
def test_timm_norm_act_keeps_activation(name):
    """pytorch#187298, timm#1254: a BatchNormAct2d replaced by a bare norm drops its activation."""
    pytest.importorskip("timm")
    model = randomize_norm_stats(normsurgeon.load_model(f"timm:{name}"))
    acts = {n for n, m in bn_layers(model).items() if not isinstance(getattr(m, "act", nn.Identity()), nn.Identity)}
    assert acts, "sample model should have BN layers with a fused activation"
    shape = (2, 3, 64, 64)
    r = normsurgeon.convert(model, "gn:8", input_shape=shape)
    for n in acts:
        assert isinstance(r.model.get_submodule(n), NormAct)
    x = torch.randn(shape)
    with torch.no_grad():
        got = first(r.model.eval()(x))
        want = first(_by_hand_gn(model, 8).eval()(x))
        no_act = copy_without_acts(model)
        dropped = first(_by_hand_gn(no_act, 8).eval()(x))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(dropped, want) > 1e-2  # the check can tell a dropped activation apart


def copy_without_acts(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, BN) and isinstance(getattr(mod, "act", None), nn.Module):
            mod.act = nn.Identity()
    return m


def test_fallback_reason_reaches_the_report_and_json():
    pytest.importorskip("timm")
    r = normsurgeon.convert(normsurgeon.load_model("timm:mobilevit_xxs"), "frozen", input_shape=(2, 3, 64, 64))
    d = r.to_dict()
    assert d["path"] == "module-swap"
    assert d["changes"][0]["action"] == "fallback" and "TraceError" in d["changes"][0]["detail"]
    assert isinstance(r.model.get_submodule("stem.conv"), nn.Conv2d)
    assert not isinstance(r.model.get_submodule("stem.conv"), WSConv2d)
