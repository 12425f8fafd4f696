"""Recalibration through the C kernel: the same statistics as the torch path and as torch's own
train-mode BN, the layers left exactly as they were, and the report saying which kernel ran."""
import pytest
import torch
import torchvision
from torch import nn

import normsurgeon
from normsurgeon.errors import DataError
from normsurgeon.native import moments as native
from tests.test_calibrate_stats import reference_stats
from tests.util import randomize_norm_stats

pytestmark = pytest.mark.skipif(native.kernel() is None, reason=f"no native kernel here: {native.why_not()}")


def bn_stats(model):
    return {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
            for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def no_instance_forward(model) -> bool:
    return not any("forward" in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module")
def resnet32():
    torch.manual_seed(0)
    return randomize_norm_stats(torchvision.models.resnet18(weights=None, num_classes=10), seed=2).eval()


def test_native_statistics_equal_torch_path_and_train_mode_reference(resnet32):
    x = torch.randn(10, 3, 32, 32) * 2 + 0.5
    fast = normsurgeon.recalibrate(resnet32, x, batch_size=4, shuffle=False)
    with native.torch_only():
        slow = normsurgeon.recalibrate(resnet32, x, batch_size=4, shuffle=False)
    assert fast.info["statistics_kernel"].startswith("native")
    assert slow.info["statistics_kernel"].startswith("torch reductions (turned off")
    ref = reference_stats(resnet32, x, [(0, 4), (4, 10)])
    a, b = bn_stats(fast.model), bn_stats(slow.model)
    assert len(a) == len(ref) == 20
    for name, (mean, var, calls) in ref.items():
        torch.testing.assert_close(a[name][0], b[name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[name][0], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[name][1], var, rtol=1e-4, atol=1e-5)
        assert a[name][2] == b[name][2] == calls
    assert no_instance_forward(fast.model) and no_instance_forward(resnet32)


def test_layers_are_restored_when_the_pass_fails():
    """9x9 inputs give the Linear 196 features instead of 144: the pass fails after the BN ran, and
    no wrapper may be left behind."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(DataError, match="cannot run on data batches"):
        normsurgeon.recalibrate(net, torch.randn(8, 3, 9, 9), batch_size=4)
    assert no_instance_forward(net)


class Shared(nn.Module):
    """One BN module called twice per forward, and a BN whose forward was already replaced on the
    instance (the wrapper must keep it, and put it back)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.other.forward = self._doubled

    def _doubled(self, x):
        return 2 * nn.functional.batch_norm(x, self.other.running_mean, self.other.running_var,
                                            self.other.weight, self.other.bias, False, 0.0, self.other.eps)

    def forward(self, x):
        return self.other(self.bn(self.conv(self.bn(x))))


def test_shared_module_and_instance_forward():
    torch.manual_seed(1)
    net = Shared().eval()
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    fast = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    with native.torch_only():
        slow = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    for name in ("bn", "other"):
        a, b = getattr(fast.model, name), getattr(slow.model, name)
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    assert int(fast.model.bn.num_batches_tracked) == 4  # two calls per batch, two batches
    assert fast.model.other.__dict__["forward"].__name__ == "_doubled"
    assert "forward" not in fast.model.bn.__dict__


def test_timm_bn_act_takes_the_native_path():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU),
                        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(12, 3, 10, 10)
    fast = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    with native.torch_only():
        slow = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    # the plain BN (3 calls) normalizes in place; BatchNormAct2d (a subclass adding an activation) does not
    assert fast.info["statistics_kernel"] == "native (one-pass C kernel); 3 of 6 layer calls normalized in place"
    for i in (1, 3):
        torch.testing.assert_close(fast.model[i].running_var, slow.model[i].running_var, rtol=1e-5, atol=1e-6)


def test_float64_models_use_the_torch_path_and_say_why():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double().eval()
    res = normsurgeon.recalibrate(net, torch.randn(8, 2, 4, 4, dtype=torch.float64), batch_size=4)
    assert res.info["statistics_kernel"] == "torch reductions (the C kernel takes only torch BN with contiguous CPU float32 inputs)"


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("mean, side", [(1000.0, 14), (300.0, 56), (-500.0, 3)])
def test_large_mean_small_spread_keeps_the_variance(path, mean, side):
    """Activations with |mean| >> spread: E[x^2] - E[x]^2 cancels almost every digit of float32 sums
    of x^2 (an unshifted kernel was 20% off at mean 1000, spread 1). Shifted partial sums keep the
    pooled variance within 1e-4 of a float64 computation on both paths."""
    g = torch.Generator().manual_seed(int(abs(mean)) + side)
    x = torch.randn(24, 3, side, side, generator=g) * torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1) + mean
    net = nn.Sequential(nn.BatchNorm2d(3)).eval()
    if path == "native":
        res = normsurgeon.recalibrate(net, x, batch_size=8, shuffle=False)
    else:
        with native.torch_only():
            res = normsurgeon.recalibrate(net, x, batch_size=8, shuffle=False)
    assert res.info["statistics_kernel"].startswith(path)
    flat = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(res.model[0].running_var.double(), flat.var(1), rtol=1e-4, atol=0)
    torch.testing.assert_close(res.model[0].running_mean.double(), flat.mean(1), rtol=1e-6, atol=0)


def test_channels_last_inputs_are_counted_and_reported():
    """A channels_last model: its BN inputs are not contiguous, so those calls take the torch path,
    and the report says how the calls split (the first BN sees the contiguous data batch)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 6, 6)
    res = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    assert res.info["statistics_kernel"] == ("native for 2 of 4 layer calls, else torch reductions (the C kernel "
                                             "takes only torch BN with contiguous CPU float32 inputs)")
    with native.torch_only():
        slow = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    for i in (0, 2):
        torch.testing.assert_close(res.model[i].running_var, slow.model[i].running_var, rtol=1e-5, atol=1e-6)
