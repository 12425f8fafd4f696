"""Exact pooled statistics: recalibrate vs an independent computation through torch's own train-mode BN."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import normsurgeon
from normsurgeon.calibrate.data import TensorData
from normsurgeon.calibrate.plan import make_plan
from tests.util import randomize_norm_stats

STATS = ("running_mean", "running_var", "num_batches_tracked")


def reference_stats(model, x, batch_bounds):
    """Per-BN pooled (mean, unbiased var) with torch's train-mode BN normalizing each batch."""
    ref = copy.deepcopy(model).eval()
    seen = {}
    hooks = []
    for name, m in ref.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone())))
    with torch.no_grad():
        for start, stop in batch_bounds:
            ref(x[start:stop])
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in seen.items():
        v = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], dim=1)
        out[name] = (v.mean(1), v.var(1, unbiased=True), len(xs))
    return out


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_norm_stats(torchvision.models.resnet18(weights=None, num_classes=10), seed=1).double().eval()


def test_pooled_stats_match_train_mode_reference(resnet):
    x = torch.randn(10, 3, 32, 32, dtype=torch.float64) * 2 + 0.5
    before = copy.deepcopy(resnet.state_dict())
    res = normsurgeon.recalibrate(resnet, x, batch_size=4, shuffle=False)
    # 10 samples, batch 4: the remainder of 2 joins the last batch -> batches of 4 and 6
    ref = reference_stats(resnet, x, [(0, 4), (4, 10)])
    new = dict(res.model.named_modules())
    assert len(ref) == 20 and res.count("recalibrated") == 20
    for name, (mean, var, calls) in ref.items():
        bn = new[name]
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(bn.num_batches_tracked) == calls
    # the input model is untouched; in the result only running statistics differ, bit for bit
    for k, v in resnet.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = set()
    for k, v in res.model.state_dict().items():
        if not torch.equal(v, before[k]):
            changed.add(k)
            assert k.rsplit(".", 1)[1] in STATS, k
    assert any(k.endswith("running_var") for k in changed)
    assert res.info["samples"] == 10 and res.verb == "recalibrate"
    assert normsurgeon.provenance.get(res.model)["steps"][-1]["args"]["replay"] is False


def test_pooling_is_not_averaged_batch_variances():
    """Batches with different means: the pooled variance includes the spread of the batch means."""
    bn = nn.Sequential(nn.BatchNorm2d(2)).double().eval()
    x = torch.cat([torch.randn(4, 2, 3, 3, dtype=torch.float64) - 3, torch.randn(4, 2, 3, 3, dtype=torch.float64) + 3])
    res = normsurgeon.recalibrate(bn, x, batch_size=4, shuffle=False)
    flat = x.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(res.model[0].running_var, flat.var(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.model[0].running_mean, flat.mean(1), rtol=1e-12, atol=1e-14)
    averaged = torch.stack([x[:4].transpose(0, 1).reshape(2, -1).var(1), x[4:].transpose(0, 1).reshape(2, -1).var(1)]).mean(0)
    assert (res.model[0].running_var - averaged).abs().min() > 1.0


class DropNet(nn.Module):
    """Dropout feeds a BN: recalibration must run with dropout off (deterministic statistics)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm1d(4)

    def forward(self, x):
        h = self.drop(torch.relu(self.b1(self.c1(x))))
        return self.b2(self.c2(h).mean((2, 3)))


def test_dropout_stays_off_and_samples_are_counted():
    torch.manual_seed(0)
    net = DropNet().double().eval()
    x = torch.randn(9, 3, 6, 6, dtype=torch.float64)
    a = normsurgeon.recalibrate(net, x, samples=8, batch_size=4, shuffle=False).model
    b = normsurgeon.recalibrate(net, x, samples=8, batch_size=4, shuffle=False).model
    assert torch.equal(a.b2.running_var, b.b2.running_var)
    ref = reference_stats(net, x, [(0, 4), (4, 8)])  # reference: eval mode -> dropout off
    torch.testing.assert_close(a.b2.running_var, ref["b2"][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.b1.running_mean, ref["b1"][0], rtol=1e-10, atol=1e-12)
    assert a.drop.training is False


def test_plan_counts_samples_and_merges_remainder():
    p = make_plan(10, 4, shuffle=False)
    assert p.bounds == ((0, 4), (4, 10)) and p.samples == 10
    assert make_plan(10, 4, batches=2).samples == 8
    assert make_plan(10, 3, samples=7, shuffle=False).bounds == ((0, 3), (3, 7))
    assert sorted(p.shard(0, 2) + p.shard(1, 2)) == [0, 1]


def test_unreachable_and_untracked_layers_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)
            self.free = nn.BatchNorm2d(2, track_running_stats=False)
            self.unused = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.free(self.bn(self.c(x)))

    net = Net().eval()
    res = normsurgeon.recalibrate(net, TensorData(torch.randn(8, 3, 4, 4)), batch_size=4)
    actions = {c.target: c.action for c in res.changes}
    assert actions == {"bn": "recalibrated", "free": "skipped", "unused": "skipped"}
    assert torch.equal(res.model.unused.running_var, net.unused.running_var)


class Overflow(nn.Module):
    """Finite data, but the second BN sees +inf: the model itself overflows float32."""

    def __init__(self):
        super().__init__()
        self.b1, self.b2 = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.b2(torch.exp(self.b1(x) * 200))


def test_non_finite_statistics_name_the_layer_and_leave_the_input_alone():
    net = Overflow().eval()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(normsurgeon.errors.DataError, match=r"statistics of b2 are not finite"):
        normsurgeon.recalibrate(net, torch.randn(8, 2, 4, 4), batch_size=4)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
