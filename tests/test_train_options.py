"""convert --init revisited / --input-norm (API and CLI), and recipe listing in --help."""
import json

import pytest
import torch

import normsurgeon
from normsurgeon.errors import RecipeError
from normsurgeon.layers import InputNorm, ProxyNorm
from tests.util import randomize_norm_stats, run_cli

SHAPE = (2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet():
    return randomize_norm_stats(normsurgeon.load_model("timm:test_resnet"))


def test_revisited_init_sets_every_norm_scale(resnet):
    res = normsurgeon.convert(resnet, "bcn", input_shape=SHAPE, init="revisited")
    norms = [m for m in res.model.modules() if type(m).__name__ in ("EstimatedBatchNorm", "ChannelGroupNorm")]
    assert len(norms) == 30
    assert all(torch.all(m.weight == 0.1) and torch.all(m.bias == 0) for m in norms)
    assert res.count("initialized") == 30
    assert res.verification.tolerance is None


def test_revisited_init_leaves_kept_and_frozen_layers_alone(resnet):
    """--keep means untouched; a frozen layer's affine is a buffer training could never move back."""
    from normsurgeon.layers import FrozenBatchNorm

    before = dict(resnet.named_modules())
    res = normsurgeon.convert(resnet, "gn+ws", input_shape=SHAPE, init="revisited", keep=["layer4.*"],
                              layers={"layer1.*": "frozen"})
    after = dict(res.model.named_modules())
    kept = [n for n, m in after.items() if n.startswith("layer4.") and isinstance(m, torch.nn.BatchNorm2d)]
    assert kept
    for n in kept:
        assert torch.equal(after[n].weight, before[n].weight) and torch.equal(after[n].bias, before[n].bias), n
    frozen = [n for n, m in after.items() if isinstance(m, FrozenBatchNorm)]
    assert frozen and all(n.startswith("layer1.") for n in frozen)
    for n in frozen:
        torch.testing.assert_close(after[n].weight, before[n].weight.detach(), rtol=0, atol=0)
    skipped = {c.target for c in res.changes if c.action == "skipped" and "--init" in c.detail}
    assert skipped == set(frozen)
    converted = [m for n, m in after.items() if isinstance(m, torch.nn.GroupNorm)]
    assert converted and all(torch.all(m.weight == 0.1) for m in converted)


def test_revisited_init_leaves_proxy_parameters_alone(resnet):
    res = normsurgeon.convert(resnet, "gn+pn", input_shape=SHAPE, init="revisited")
    pn = res.model.bn1_post
    assert isinstance(pn, ProxyNorm) and torch.all(pn.affine_source.weight == 0.1)
    assert torch.all(pn.proxy_scale == 0) and torch.all(pn.proxy_shift == 0)


def test_input_norm_is_prepended_and_normalizes(resnet):
    res = normsurgeon.convert(resnet, "gn", input_shape=SHAPE, input_norm=True)
    model = res.model
    assert isinstance(model.input_norm, InputNorm)
    x = torch.randn(SHAPE) * 5 + 3
    seen = {}
    h = model.conv1.get_submodule("0").register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model.train()(x)
    h.remove()
    ref = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(seen["x"], 0.058 * ref, atol=1e-5)
    assert {"init", "input_norm"} & set(normsurgeon.provenance.get(model)["steps"][-1]["args"]) == {"input_norm"}


def test_input_norm_on_the_module_swap_path():
    class Untraceable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace
                return x
            return self.bn(self.conv(x))

    res = normsurgeon.convert(Untraceable(), "gn", input_shape=(2, 3, 8, 8), input_norm=True)
    assert res.path == "module-swap"
    assert isinstance(res.model.conv[0], InputNorm)


def test_bad_init_is_a_user_error(resnet):
    with pytest.raises(RecipeError, match="revisited"):
        normsurgeon.convert(resnet, "gn", input_shape=SHAPE, init="fancy")


def test_cli_convert_with_training_options_round_trips(tmp_path):
    out = tmp_path / "m.pt"
    r = run_cli("convert", "timm:test_resnet", "--to", "ln+pn", "--init", "revisited", "--input-norm",
                "--input-shape", "2,3,32,32", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["summary"]["replaced"] == 15 and report["summary"]["inserted"] == 1
    model = normsurgeon.load_model(str(out))
    assert isinstance(model.input_norm, InputNorm) and torch.all(model.bn1.weight == 0.1)
    h = run_cli("convert", "--help")
    for name in ("ln+pn", "gn+ws+pn", "bcn", "bgn", "ghost", "bn+gn", "ebn"):
        assert name in h.stdout
