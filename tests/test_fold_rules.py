"""Each fold rule against an independent computation: the unfolded model itself, run in float64.

A rule that gets the weight layout, the padding condition or the shift wrong moves the output by far
more than float64 rounding (1e-12), so every test here can fail.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon
from normsurgeon.errors import VerificationError
from normsurgeon.layers import ChannelAffine, FrozenBatchNorm, WSConv2d
from tests.util import randomize_norm_stats

TOL64 = 1e-10


def _check(model: nn.Module, shape, **kw):
    model = randomize_norm_stats(model).double().eval()
    res = normsurgeon.fold(model, input_shape=shape, **kw)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        ref, got = model(x), res.model(x)
    err = ((ref - got).abs().max() / ref.abs().max()).item()
    assert err < TOL64, f"fold changed the output by {err:.2e}"
    return res


def _bn_left(m: nn.Module) -> int:
    return sum(isinstance(q, nn.modules.batchnorm._BatchNorm) for q in m.modules())


def _by_target(res):
    return {c.target: c for c in res.changes}


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d(6), (2, 4, 5, 5, 5)),
    (nn.Conv2d(6, 12, 3, groups=3, padding=1), nn.BatchNorm2d(12), (2, 6, 7, 7)),
    (nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), nn.BatchNorm2d(8), (2, 8, 7, 7)),  # depthwise
    (nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2), nn.BatchNorm2d(8), (2, 6, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Linear(5, 7), nn.BatchNorm1d(7), (3, 5)),
])
def test_backward_fold_into_producer(conv, bn, shape):
    res = _check(nn.Sequential(conv, bn, nn.ReLU()), shape)
    assert _bn_left(res.model) == 0
    c = _by_target(res)["1"]
    assert (c.action, c.after) == ("folded", "0")


@pytest.mark.parametrize("padding, padding_mode, folds", [
    (0, "zeros", True), (1, "zeros", False), (1, "reflect", True), (1, "circular", True),
])
def test_forward_fold_shift_only_without_zero_padding(padding, padding_mode, folds):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=padding, padding_mode=padding_mode))
    res = _check(model, (2, 4, 8, 8))
    assert _bn_left(res.model) == 0
    c = _by_target(res)["0"]
    if folds:
        assert c.action == "folded" and "forward" in c.detail
        assert not any(isinstance(m, ChannelAffine) for m in res.model.modules())
    else:
        assert c.action == "affine" and "zero padding" in c.detail
        assert sum(isinstance(m, ChannelAffine) for m in res.model.modules()) == 1


class TwoConsumers(nn.Module):
    def __init__(self, pad_second: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.a = nn.Conv2d(6, 4, 1)
        self.b = nn.Conv2d(6, 4, 3, padding=pad_second, groups=2, bias=False)

    def forward(self, x):
        y = self.bn(x)
        return torch.cat([self.a(y)[..., :4, :4], self.b(y)[..., :4, :4]], 1)


@pytest.mark.parametrize("pad", [0, 1])
def test_forward_fold_needs_all_consumers(pad):
    res = _check(TwoConsumers(pad), (2, 6, 8, 8))
    c = _by_target(res)["bn"]
    assert c.action == ("folded" if pad == 0 else "affine")
    if pad:
        assert "b:" in c.detail  # names the consumer that blocks the shift


def test_forward_fold_into_linear_and_transpose_conv_scale_only():
    lin = _check(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5))
    assert _by_target(lin)["0"].action == "folded"
    tr = _check(nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 2, 3)), (2, 4, 5, 5))
    assert _by_target(tr)["0"].action == "affine"  # a transpose conv cannot absorb a shift


class ConcatBN(nn.Module):
    """DenseNet-style: BN after a concat, another BN right after it, then an activation."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.cat([self.c1(x), self.c2(x)], 1)
        return self.conv(torch.relu(self.bn2(self.bn1(y)))) + y.sum()


def test_chain_of_affines_merges_into_one():
    res = _check(ConcatBN(), (2, 3, 6, 6))
    ch = _by_target(res)
    assert ch["bn1"].action == "affine" and ch["bn2"].action == "merged" and ch["bn2"].after == "bn1"
    assert sum(isinstance(m, ChannelAffine) for m in res.model.modules()) == 1
    assert _bn_left(res.model) == 0


class SharedConv(nn.Module):
    """pytorch#104593: one conv, two call sites, BN after only one of them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class ResidualUse(nn.Module):
    """The conv output also feeds the residual add: folding BN into it would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("cls", [SharedConv, ResidualUse])
def test_never_folds_into_a_conv_with_other_uses(cls):
    model = cls()
    before = model.conv.weight.detach().clone()
    res = _check(model, (2, 3, 6, 6))
    assert _by_target(res)["bn"].action == "affine"
    assert torch.equal(res.model.conv.weight.detach().float(), before)


class FunctionalBN(nn.Module):
    def __init__(self, training: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.training_flag = training

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, self.training_flag, 0.1, 1e-5)


def test_functional_batch_norm_with_stored_stats_folds():  # pytorch#122070
    res = _check(FunctionalBN(False), (2, 3, 6, 6))
    folded = [c for c in res.changes if c.before == "F.batch_norm"]
    assert folded and folded[0].action == "folded"
    assert "batch_norm" not in res.model.code


def test_functional_batch_norm_with_batch_stats_is_kept():
    res = normsurgeon.fold(FunctionalBN(True).eval(), input_shape=(2, 3, 6, 6))
    assert [c.action for c in res.changes if c.before == "F.batch_norm"] == ["kept"]


def test_timm_batchnorm_act_keeps_its_activation():  # pytorch#187298, timm#1254
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    res = _check(model, (2, 3, 6, 6))
    assert _bn_left(res.model) == 0
    assert any(isinstance(m, nn.ReLU) for m in res.model.modules())
    assert "kept ReLU" in _by_target(res)["1"].detail


def test_frozen_batchnorms_and_sync_bn_fold():
    from torchvision.ops.misc import FrozenBatchNorm2d

    fbn = FrozenBatchNorm(4)
    tv = FrozenBatchNorm2d(4)
    with torch.no_grad():
        for m in (fbn, tv):
            m.running_mean.copy_(torch.randn(4))
            m.running_var.copy_(torch.rand(4) + 0.5)
            m.weight.copy_(torch.rand(4) + 0.5)
            m.bias.copy_(torch.randn(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), fbn, nn.Conv2d(4, 4, 1), tv, nn.Conv2d(4, 4, 1),
                          nn.SyncBatchNorm(4))
    res = _check(model, (2, 3, 6, 6))
    assert [c.action for c in res.changes] == ["folded", "folded", "folded"]
    assert not any(isinstance(m, (FrozenBatchNorm, FrozenBatchNorm2d)) for m in res.model.modules())


class AffineLayer(nn.Module):
    """A teammate's layer speaking the eval_affine protocol (layers/affine.py)."""

    def __init__(self, c: int, foldable: bool = True, lie: bool = False):
        super().__init__()
        self.s, self.t = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.foldable, self.lie = foldable, lie

    def eval_affine(self):
        if not self.foldable:
            return None
        return (self.s * 2, self.t) if self.lie else (self.s, self.t)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.s.reshape(shape) + self.t.reshape(shape)


def test_eval_affine_protocol_is_a_rule():
    res = _check(nn.Sequential(nn.Conv2d(3, 4, 3), AffineLayer(4)), (2, 3, 6, 6))
    assert _by_target(res)["1"].action == "folded"
    res = normsurgeon.fold(nn.Sequential(nn.Conv2d(3, 4, 3), AffineLayer(4, foldable=False)), input_shape=(2, 3, 6, 6))
    c = _by_target(res)["1"]
    assert c.action == "kept" and "eval_affine() is None" in c.detail


def test_verify_raises_when_a_layer_lies_about_its_affine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), AffineLayer(4, lie=True)).eval()
    assert not normsurgeon.fold(model, input_shape=(2, 3, 6, 6)).verification.ok
    with pytest.raises(VerificationError):
        normsurgeon.fold(model, input_shape=(2, 3, 6, 6), verify=True)


def test_keep_and_no_running_stats_leave_bn_with_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False))
    res = normsurgeon.fold(randomize_norm_stats(model).eval(), input_shape=(2, 3, 6, 6), keep=("1",))
    ch = _by_target(res)
    assert ch["1"].action == "kept" and ch["1"].detail == "matches keep"
    assert ch["3"].action == "kept" and "batch statistics" in ch["3"].detail
    assert _bn_left(res.model) == 2


@pytest.mark.parametrize("form", ["var", "std"])
def test_ws_conv_becomes_plain_conv(form):
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ws = WSConv2d.from_conv(conv, eps=1e-5, form=form)
    res = _check(nn.Sequential(ws, nn.GroupNorm(2, 6)), (2, 4, 6, 6))
    new = res.model.get_submodule("0")
    assert type(new) is nn.Conv2d
    w = conv.weight.detach().double().reshape(6, -1)
    sd = w.var(1, unbiased=True, keepdim=True)
    sigma = (sd + 1e-5).sqrt() if form == "var" else sd.sqrt() + 1e-5
    expect = ((w - w.mean(1, keepdim=True)) / sigma).reshape(conv.weight.shape)
    assert torch.allclose(new.weight.double(), expect, atol=1e-12)
    assert _by_target(res)["1"].action == "kept"  # GroupNorm: statistics per input


@pytest.mark.parametrize("cls", ["StdConv2d", "ScaledStdConv2d"])
def test_timm_std_convs_become_plain_convs(cls):
    import timm.layers as tl

    conv = getattr(tl, cls)(4, 6, 3)
    if cls == "ScaledStdConv2d":
        with torch.no_grad():
            conv.gain.uniform_(0.5, 2.0)
    res = _check(nn.Sequential(conv, nn.BatchNorm2d(6)), (2, 4, 6, 6))  # WS, then BN into the plain conv
    assert type(res.model.get_submodule("0")) is nn.Conv2d and _bn_left(res.model) == 0
    w = conv.weight.detach().double().reshape(6, -1)
    expect = (w - w.mean(1, keepdim=True)) / (w.var(1, unbiased=False, keepdim=True) + conv.eps).sqrt()
    if cls == "ScaledStdConv2d":
        expect = expect * conv.gain.detach().double().reshape(6, 1) * conv.scale
    plain = normsurgeon.fold(nn.Sequential(conv).double(), input_shape=(2, 4, 6, 6)).model.get_submodule("0")
    assert type(plain) is nn.Conv2d
    assert torch.allclose(plain.weight.double(), expect.reshape(conv.weight.shape), atol=1e-12)


class LinearTokens(nn.Module):
    """LeViT's LinearNorm: Linear over tokens, BN1d over the flattened tokens."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_bn_over_linear_tokens_folds_backward():
    res = _check(LinearTokens(), (2, 5, 6))
    assert _by_target(res)["bn"].action == "folded"


class Untraceable(nn.Module):
    """Data-dependent control flow (pytorch#87777): fx fails, the module-swap path runs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if y.sum() > -1e9:
            z = self.conv2(y)
            y = self.bn2(z) + z  # the conv2 output has another use: bn2 must not fold into it
        return self.head(self.bn3(y))


def test_fallback_path_folds_exactly_and_says_so():
    model = Untraceable()
    res = _check(model, (2, 3, 6, 6))
    assert res.path == "module-swap"
    ch = _by_target(res)
    assert ch["<model>"].action == "fallback" and "cannot trace" in ch["<model>"].detail
    assert ch["bn1"].action == "folded" and ch["bn2"].action == "affine" and ch["bn3"].action == "folded"
    assert _bn_left(res.model) == 0


def test_model_failing_on_probe_gives_probe_error():
    from normsurgeon.graph.probe import ProbeError

    with pytest.raises(ProbeError, match="suggests N,C,H,W.*input-shape"):
        normsurgeon.fold(nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4)), input_shape=(1, 3, 2, 2))


def test_input_untouched_and_provenance_recorded():
    model = randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = normsurgeon.fold(model, input_shape=(1, 3, 8, 8), keep=("1",))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from normsurgeon import provenance

    assert provenance.get(res.model)["steps"][-1] == {"verb": "fold", "args": {"input_shape": [1, 3, 8, 8],
                                                                                "keep": ["1"]}}


class Cancelling(nn.Module):
    """Output = conv-BN minus its own folded twin: float32 rounding is all that is left, so an exact fold
    moves the float32 output by far more than 1e-5 relative (an ill-conditioned model)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        randomize_norm_stats(self)
        self.twin = nn.Conv2d(3, 4, 3)
        with torch.no_grad():
            s = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            self.twin.weight.copy_(self.conv.weight * s.reshape(-1, 1, 1, 1))
            self.twin.bias.copy_((self.conv.bias - self.bn.running_mean) * s + self.bn.bias)

    def forward(self, x):
        return self.bn(self.conv(x)) - self.twin(x) + 1e-3 * x[:, :1, :-2, :-2]


def test_float32_amplified_rounding_is_judged_in_float64():
    res = normsurgeon.fold(Cancelling().eval(), input_shape=(2, 3, 8, 8), verify=True)
    assert res.info["float64_max_rel_error"] < 1e-10
    assert res.verification.max_rel_error > 1e-5 and res.verification.ok
    assert res.verification.tolerance > 1e-5 and "rounding" in res.info["note"]


def test_keep_applies_to_ws_convs_too():
    model = nn.Sequential(WSConv2d.from_conv(nn.Conv2d(3, 4, 3)), nn.GroupNorm(2, 4)).eval()
    res = normsurgeon.fold(model, input_shape=(1, 3, 6, 6), keep=("0",))
    assert isinstance(res.model.get_submodule("0"), WSConv2d)
    assert _by_target(res)["0"].detail == "matches keep" and res.verification.max_rel_error == 0
