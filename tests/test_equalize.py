"""equalize: exact on zoo models, lowers the weights' L2 norm, reports what it skipped and why."""
import json
import math

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.graph.verify import output_error
from normsurgeon.passes.equalize import build_plan, sweep, weight_norm
from tests.util import assert_one_error_line, randomize_norm_stats, run_cli


def _zoo(spec):
    return randomize_norm_stats(normsurgeon.load_model(spec)).double()


@pytest.mark.parametrize("spec,shape,min_pairs", [
    ("torchvision:squeezenet1_1", (2, 3, 64, 64), 8),  # concats; squeeze conv feeds two expand convs
    ("timm:test_resnet", (2, 3, 32, 32), 4),  # residual adds; eval BN affines as producers
])
def test_exact_and_norm_drops(spec, shape, min_pairs):
    model = _zoo(spec)
    res = normsurgeon.equalize(model, input_shape=shape, iters=8)
    x = torch.randn(shape, dtype=torch.float64)
    model.eval()
    assert output_error(model(x), res.model(x))[1] <= 1e-10  # float64: only rounding
    assert res.verification.ok and res.verification.max_rel_error <= 1e-5
    assert res.count("equalized") >= min_pairs
    before, after = res.info["weight_norm_before"], res.info["weight_norm_after"]
    assert after < before * 0.999
    assert math.isclose(before, weight_norm(model)) and math.isclose(after, weight_norm(res.model))
    assert res.model is not model and weight_norm(model) == before  # input untouched


def test_skips_are_reported_with_reasons():
    res = normsurgeon.equalize(_zoo("torchvision:squeezenet1_1"), input_shape=(1, 3, 64, 64), iters=1)
    details = {c.target: c.detail for c in res.changes if c.action == "skipped"}
    assert "concat" in details["features.3.expand1x1"]
    assert "model output" in details["classifier.1"]
    res = normsurgeon.equalize(_zoo("timm:test_resnet"), input_shape=(2, 3, 32, 32), iters=1)
    details = {c.target: c.detail for c in res.changes if c.action == "skipped"}
    assert "residual add" in details["layer1.0.bn2"]
    assert "BatchNorm2d" in details["layer1.0.conv1"]  # a norm is never crossed


def test_non_homogeneous_activation_is_skipped_and_exact():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.ReLU6(), nn.Conv2d(4, 2, 1)).double()
    res = normsurgeon.equalize(model, input_shape=(2, 3, 12, 12))
    actions = {c.target: (c.action, c.detail) for c in res.changes}
    assert actions["0"][0] == "skipped" and "SiLU" in actions["0"][1]
    assert actions["2"][0] == "equalized"
    assert actions["4"][0] == "skipped" and "ReLU6" in actions["4"][1]
    assert res.verification.max_rel_error <= 1e-12


def test_matches_the_closed_form_for_one_pair():
    """With c = 1, one pair converges in one sweep to d = sqrt(R/L): both sides get norm sqrt(L R)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 3)).double()
    plan = build_plan(model, torch.randn(2, 5, dtype=torch.float64))
    left = model[0].weight.detach().norm(dim=1)
    right = model[3].weight.detach().norm(dim=0)
    sweep(model, plan, c=1.0)
    assert torch.allclose(model[0].weight.norm(dim=1), (left * right).sqrt())
    assert torch.allclose(model[3].weight.norm(dim=0), (left * right).sqrt())


def test_grouped_consumer_and_flatten_into_linear():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, padding=1),
                          nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double()
    res = normsurgeon.equalize(model, input_shape=(2, 3, 8, 8))
    assert res.count("equalized") == 2
    assert res.verification.max_rel_error <= 1e-12
    assert res.info["weight_norm_after"] < res.info["weight_norm_before"]


def test_cli_equalize(tmp_path):
    out = tmp_path / "eq.pt"
    r = run_cli("equalize", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64", "--iters", "3",
                "-o", str(out), "--json", real=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["verification"]["ok"] and rep["info"]["weight_norm_after"] < rep["info"]["weight_norm_before"]
    back = normsurgeon.load_model(str(out))
    assert weight_norm(back) == pytest.approx(rep["info"]["weight_norm_after"], rel=1e-6)


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_cli_rejects_non_finite_or_non_positive_c(tmp_path, value):
    out = tmp_path / "eq.pt"
    r = run_cli("equalize", "normsurgeon:digits_cnn", "--c", value, "-o", str(out))
    assert_one_error_line(r, "--c")
    assert not out.exists()


@pytest.mark.parametrize("kw", [{"c": math.inf}, {"c": math.nan}, {"c": 0.0}, {"iters": -1}, {"iters": 2.5}])
def test_api_rejects_bad_settings_as_user_errors(kw):
    with pytest.raises(normsurgeon.errors.RecipeError):
        normsurgeon.equalize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), input_shape=(2, 3), **kw)
