"""What is a norm layer is decided by class (isinstance) and the eval_affine / recalibration protocol,
never by a class name: a conv+BN container called ``FooNorm`` (like timm efficientvit's ``ConvNorm``)
is not a norm layer; the BN inside it is, and folds."""
from __future__ import annotations

import torch
from torch import nn

import normsurgeon
from normsurgeon.passes.fold_rules import affine_rule, not_foldable_reason
from tests.util import randomize_norm_stats


class FooNorm(nn.Sequential):
    """A container whose name ends in Norm: conv then BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class BarNorm2d(nn.Module):
    """Not a norm either (name ends in Norm2d): a plain 1x1 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.proj(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = FooNorm(3, 8)
        self.b = BarNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = self.gn(self.b(x))
        return self.head(x.mean((2, 3)))


def test_containers_named_norm_are_not_norm_layers():
    assert not_foldable_reason(FooNorm(3, 8)) is None and affine_rule(FooNorm(3, 8)) is None
    assert not_foldable_reason(BarNorm2d(8)) is None
    assert "own statistics" in not_foldable_reason(nn.GroupNorm(2, 8))


def test_fold_reports_the_bn_not_the_container():
    model = randomize_norm_stats(Net()).eval()
    res = normsurgeon.fold(model, input_shape=(2, 3, 16, 16), verify=True)
    by_target = {c.target: c for c in res.changes}
    assert "a" not in by_target and "b" not in by_target  # neither listed as a kept norm
    assert by_target["a.bn"].action == "folded"
    assert by_target["gn"].action == "kept"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), res.model(x), rtol=1e-5, atol=1e-5)


def test_inspect_lists_only_real_norm_layers():
    rep = normsurgeon.inspect(Net().eval(), input_shape=(2, 3, 16, 16))
    assert sorted(l.name for l in rep.layers) == ["a.bn", "gn"]


class PlainSubclassConv(nn.Conv3d):
    """Like torchvision's Conv3DSimple: a Conv3d subclass that only fixes its arguments."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, (3, 3, 3), padding=1, bias=False)


class ScaledConv(nn.Conv3d):
    """A subclass that transforms its weight in forward: never folded into."""

    def forward(self, x):
        return self._conv_forward(x, self.weight * 2.0, self.bias)


def test_conv_subclasses_fold_only_when_they_keep_torchs_forward():
    for conv, folded in ((PlainSubclassConv(2, 4), True), (ScaledConv(2, 4, 3, padding=1), False)):
        model = randomize_norm_stats(nn.Sequential(conv, nn.BatchNorm3d(4), nn.ReLU())).eval()
        res = normsurgeon.fold(model, input_shape=(2, 2, 4, 6, 6), verify=True)
        assert res.summary() == ({"folded": 1} if folded else {"affine": 1}), res.changes
        x = torch.randn(2, 2, 4, 6, 6)
        with torch.no_grad():
            assert torch.allclose(model(x), res.model(x), rtol=1e-5, atol=1e-5)
