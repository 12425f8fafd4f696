"""DAIN (adaptive input normalization): the three steps against a float64 NumPy computation, the
reference's division guard, gradcheck, batch independence, and ``--input-norm dain`` (API and CLI)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.errors import RecipeError
from normsurgeon.layers import DAIN
from tests.util import assert_one_error_line, run_cli


def seq_model() -> nn.Module:
    """A small 1D conv classifier over (N, 3, 32) sequences (also a MODEL spec for the CLI test)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))


def _dain(c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = DAIN(c).double()
    with torch.no_grad():
        for lin in (m.mean_layer, m.scaling_layer):
            lin.weight.add_(0.2 * torch.randn(c, c, generator=g, dtype=torch.float64))
        m.gating_layer.weight.copy_(torch.randn(c, c, generator=g))
        m.gating_layer.bias.copy_(torch.randn(c, generator=g))
    return m


def _numpy_dain(x, m):
    x = x.detach().numpy()
    wa, wb = m.mean_layer.weight.detach().numpy(), m.scaling_layer.weight.detach().numpy()
    wc, bc = m.gating_layer.weight.detach().numpy(), m.gating_layer.bias.detach().numpy()
    out = np.empty_like(x)
    for n in range(x.shape[0]):  # one sample at a time: nothing crosses samples
        a = wa @ x[n].mean(axis=1)
        x1 = x[n] - a[:, None]
        b = wb @ np.sqrt((x1 ** 2).mean(axis=1) + 1e-8)
        b[b <= 1e-8] = 1.0
        x2 = x1 / b[:, None]
        gate = 1 / (1 + np.exp(-(wc @ x2.mean(axis=1) + bc)))
        out[n] = x2 * gate[:, None]
    return torch.from_numpy(out)


def test_reference_initialisation():
    m = DAIN(4)
    assert torch.equal(m.mean_layer.weight, torch.eye(4)) and torch.equal(m.scaling_layer.weight, torch.eye(4))
    assert m.mean_layer.bias is None and m.scaling_layer.bias is None and m.gating_layer.bias is not None


def test_matches_numpy_and_is_batch_independent():
    m = _dain()
    x = torch.randn(4, 3, 20, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1) + 3
    y = m(x)
    assert torch.allclose(y, _numpy_dain(x, m))
    assert torch.allclose(m.eval()(x[:1]), y[:1]) and torch.allclose(m.train()(x[2:]), y[2:])


def test_scale_guard_replaces_non_positive_scales_by_one():
    m = _dain()
    with torch.no_grad():
        m.scaling_layer.weight.copy_(-torch.eye(3, dtype=torch.float64))  # every adaptive scale negative
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    assert torch.allclose(m(x), _numpy_dain(x, m))


def test_gradcheck():
    m = _dain()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_param_groups_scale_each_sublayer_learning_rate():
    groups = DAIN(3).param_groups(1e-3)
    assert [g["lr"] for g in groups] == pytest.approx([1e-8, 1e-8, 1e-6])
    assert sum(len(g["params"]) for g in groups) == 4


def test_convert_input_norm_dain_prepends_the_layer():
    res = normsurgeon.convert(seq_model(), "gn", input_shape=(2, 3, 32), input_norm="dain")
    model = res.model
    assert isinstance(model.input_norm, DAIN)
    x = torch.randn(5, 3, 32) * 4 + 10
    with torch.no_grad():
        rest = normsurgeon.convert(seq_model(), "gn", input_shape=(2, 3, 32)).model.eval()
        assert torch.allclose(model.eval()(x), rest(model.input_norm(x)), atol=1e-6)
    with pytest.raises(RecipeError, match="N, C, L"):
        normsurgeon.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "gn",
                            input_shape=(2, 3, 8, 8), input_norm="dain")
    with pytest.raises(RecipeError, match="valid: bn, dain"):
        normsurgeon.convert(seq_model(), "gn", input_shape=(2, 3, 32), input_norm="revin")


def test_cli_input_norm_dain_and_a_bad_value(tmp_path):
    out = tmp_path / "m.pt"
    spec = "tests.test_layers_dain:seq_model"
    r = run_cli("convert", spec, "--to", "gn", "--input-norm", "dain", "--input-shape", "2,3,32", "-o", str(out),
                "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["inserted"] == 1
    assert isinstance(normsurgeon.load_model(str(out), trust_code=True).input_norm, DAIN)
    bad = tmp_path / "bad.pt"
    r = run_cli("convert", spec, "--to", "gn", "--input-norm", "zscore", "--input-shape", "2,3,32", "-o", str(bad))
    assert_one_error_line(r, "dain")
    assert not bad.exists()
