"""FrozenBatchNorm, weight-standardized convs and NormAct against independent computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.layers.frozen_bn import FrozenBatchNorm
from normsurgeon.layers.norm_act import NormAct, bn_extras
from normsurgeon.layers.ws_conv import WSConv1d, WSConv2d, WSConv3d, standardize_weight, ws_class_for
from tests.util import randomize_norm_stats


@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm1d, (3, 6)), (nn.BatchNorm1d, (3, 6, 5)),
                                          (nn.BatchNorm2d, (3, 6, 4, 4)), (nn.BatchNorm3d, (3, 6, 2, 3, 4))])
def test_frozen_bn_is_bn_eval_any_rank(bn_cls, shape):
    bn = randomize_norm_stats(bn_cls(6, eps=1e-3)).double().eval()
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    f = FrozenBatchNorm.from_batchnorm(bn)
    assert f.running_mean.dtype == torch.float64
    view = (1, -1) + (1,) * (len(shape) - 2)
    want = (x - bn.running_mean.view(view)) / torch.sqrt(bn.running_var.view(view) + 1e-3) \
        * bn.weight.view(view) + bn.bias.view(view)
    torch.testing.assert_close(f(x), want, rtol=1e-12, atol=1e-12)
    f.train()
    torch.testing.assert_close(f(x), want, rtol=1e-12, atol=1e-12)  # train mode: same, nothing updates
    assert not list(f.parameters()) and set(f.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    scale, shift = f.eval_affine()
    torch.testing.assert_close(x * scale.view(view) + shift.view(view), want)


def test_frozen_bn_from_non_affine_bn():
    bn = randomize_norm_stats(nn.BatchNorm2d(4, affine=False)).eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(FrozenBatchNorm.from_batchnorm(bn)(x), bn(x))


@pytest.mark.parametrize("form", ["var", "std"])
def test_standardize_weight_formula(form):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 2 + 1
    got = standardize_weight(w, eps=1e-5, form=form)
    for o in range(5):
        v = w[o].flatten()
        mu, n = v.sum() / v.numel(), v.numel()
        var = ((v - mu) ** 2).sum() / (n - 1)
        sigma = torch.sqrt(var + 1e-5) if form == "var" else torch.sqrt(var) + 1e-5
        torch.testing.assert_close(got[o].flatten(), (v - mu) / sigma)
    with pytest.raises(ValueError):
        standardize_weight(w, form="bogus")


@pytest.mark.parametrize("conv,ws_cls,shape", [
    (nn.Conv1d(4, 6, 3, padding=1, bias=True), WSConv1d, (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), WSConv2d, (2, 4, 9, 9)),
    (nn.Conv3d(4, 6, 2, dilation=2), WSConv3d, (2, 4, 5, 5, 5)),
])
def test_ws_conv_from_conv(conv, ws_cls, shape):
    assert ws_class_for(conv) is ws_cls
    ws = ws_cls.from_conv(conv, eps=1e-5, form="var")
    assert ws.weight is conv.weight and ws.bias is conv.bias  # shared, so gradients reach the original
    x = torch.randn(shape)
    ref = conv._conv_forward(x, standardize_weight(conv.weight), conv.bias)
    torch.testing.assert_close(ws(x), ref)
    assert ws_class_for(ws) is None  # already standardized
    ws(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_ws_class_for_non_conv():
    assert ws_class_for(nn.Linear(3, 3)) is None
    assert ws_class_for(nn.ConvTranspose2d(3, 3, 3)) is None


def test_norm_act_order_and_extras():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.5))
    drop, act = bn_extras(bn)
    assert isinstance(drop, nn.Dropout) and isinstance(act, nn.SiLU)
    assert bn_extras(nn.BatchNorm2d(4)) == (None, None)
    assert bn_extras(BatchNormAct2d(4, apply_act=False)) == (None, None)
    gn = nn.GroupNorm(2, 4)
    post = nn.Linear(3, 3)
    m = NormAct(gn, drop, act, post).eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x), post(F.silu(gn(x))))
    assert set(dict(m.named_children())) == {"norm", "drop", "act", "post"}
    m.train()  # the dropout BN's subclass carried is really applied in training, and only there
    torch.manual_seed(0)
    y = m(x)
    assert not torch.allclose(y, post(F.silu(gn(x)))) and (m.drop(torch.ones(1000)) == 0).any()
