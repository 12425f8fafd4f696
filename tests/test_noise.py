"""The weight-noise model: scale, reproducibility, exact restore, and the same instance everywhere."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import normsurgeon
from normsurgeon.calibrate.noise import (
    NoiseSpecError, WeightNoise, fixed_stream, noise_instance, noise_targets, parse_noise, resample_stream,
)
from tests.util import randomize_norm_stats


def test_spec_parsing_and_errors():
    assert parse_noise("weight:0.1").eta == 0.1 and parse_noise(None) is None
    for bad in ("weight", "weight:x", "weight:-1", "read:0.1", "weight:nan"):
        with pytest.raises(NoiseSpecError):
            parse_noise(bad)


def test_noise_scale_is_eta_max_abs_per_layer_on_conv_and_linear_only():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    inst = noise_instance(model, "weight:0.2", seed=5)
    mods = dict(model.named_modules())
    assert set(inst) == {n for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    big = mods["layer4.1.conv2"].weight.detach()
    eps = inst["layer4.1.conv2"]
    assert eps.shape == big.shape
    assert abs(float(eps.std()) / (0.2 * float(big.abs().max())) - 1) < 0.01  # 2.4M draws
    assert abs(float(eps.mean())) < 0.01 * float(eps.std())


def test_instances_reproducible_distinct_and_restored_bit_exactly():
    torch.manual_seed(0)
    model = randomize_norm_stats(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    clean = copy.deepcopy(model.state_dict())
    a, b = noise_instance(model, "weight:0.1", 3), noise_instance(model, "weight:0.1", 3)
    c = noise_instance(model, "weight:0.1", 4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["conv1"], c["conv1"])
    wn = WeightNoise(model, parse_noise("weight:0.1"))
    try:
        with wn:
            wn.apply(*fixed_stream(3))
            torch.testing.assert_close(model.conv1.weight - clean["conv1.weight"], a["conv1"], rtol=0, atol=1e-6)
            wn.apply(*resample_stream(3, 0, 0))
            assert not torch.allclose(model.conv1.weight - clean["conv1.weight"], a["conv1"])
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    for k, v in model.state_dict().items():
        assert torch.equal(v, clean[k]), k


def test_shared_weight_gets_noise_once():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    assert len(noise_targets(net)) == 1


def _bn_inputs(model, x, noise_eps):
    """BN input moments of a model whose weights carry ``noise_eps`` (independent of recalibrate)."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, eps in noise_eps.items():
            mods[name].weight.add_(eps)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.train()
        got = {}
        hooks = [mods[n].register_forward_pre_hook(lambda mod, a, n=n: got.setdefault(n, []).append(a[0].clone()))
                 for n, mm in mods.items() if isinstance(mm, nn.BatchNorm2d)]
        m(x)
    for h in hooks:
        h.remove()
    return got


def test_fixed_and_resample_modes_use_the_documented_instances():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).double().eval()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    fixed = normsurgeon.recalibrate(net, x, batch_size=4, noise="weight:0.3", noise_seed=9).model
    ref = _bn_inputs(net, x, noise_instance(net, "weight:0.3", 9))["4"][0]
    v = ref.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(fixed[4].running_var, v.var(1), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(fixed.parameters(), net.parameters()))  # clean weights kept

    # resample, K = 3 draws of one batch: E[x] and E[x^2] pooled across the draws
    res = normsurgeon.recalibrate(net, x, batch_size=4, noise="weight:0.3", noise_mode="resample",
                                  noise_seed=2, noise_samples=3).model
    wn = WeightNoise(net, parse_noise("weight:0.3"))
    names = [n for n, _ in wn.targets]
    draws = [_bn_inputs(net, x, dict(zip(names, wn.draw(*resample_stream(2, 0, k)))))["4"][0] for k in range(3)]
    allv = torch.cat([d.transpose(0, 1).reshape(4, -1) for d in draws], 1)
    torch.testing.assert_close(res[4].running_mean, allv.mean(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res[4].running_var, allv.var(1), rtol=1e-10, atol=1e-12)
    per_draw = torch.stack([d.transpose(0, 1).reshape(4, -1).var(1, unbiased=False) for d in draws]).mean(0)
    spread = allv.var(1, unbiased=False) - per_draw  # the spread between chips is in the variance
    assert (spread >= 0).all() and spread.sum() > 1e-3


def test_bad_noise_options():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    x = torch.randn(4, 1, 2, 2)
    for kw in ({"noise_mode": "resample"}, {"noise": "weight:0.1", "noise_samples": 2},
               {"noise": "weight:0.1", "noise_mode": "chip"}, {"noise": "weight:0.1", "noise_seed": -1},
               {"noise_seed": 3}):
        with pytest.raises(NoiseSpecError):
            normsurgeon.recalibrate(net, x, batch_size=2, **kw)


def test_evaluate_refuses_a_seed_without_noise():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(NoiseSpecError, match="--noise-seed needs --noise"):
        normsurgeon.evaluate(net, (torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])), noise_seed=0)
