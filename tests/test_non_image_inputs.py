"""Inputs that are not images go through every verb with --input-shape: sequences (N, C, L), raw
audio (N, L), tables (N, F), volumes (N, C, D, H, W). A forward with keyword defaults
(``forward(self, x, embed=False)``) traces with them bound. A default probe the model rejects says
what shapes its first layer suggests."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.graph.trace import try_trace
from tests import nonimage_models as zoo
from tests.util import ROOT, assert_one_error_line, randomize_norm_stats, run_cli

CASES = [("seq1d", (4, 4, 32)), ("wave", (4, 400)), ("tab", (4, 10)), ("vol", (2, 2, 6, 8, 8))]
BN = nn.modules.batchnorm._BatchNorm


def _rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("factory, shape", CASES, ids=[c[0] for c in CASES])
def test_every_verb_on_non_image_inputs(factory, shape, tmp_path):
    model = randomize_norm_stats(getattr(zoo, factory)()).eval()
    x = torch.randn(shape) * 2 + 0.3  # an input no pass saw
    with torch.no_grad():
        ref = model(x)

    rep = normsurgeon.inspect(model, input_shape=shape)
    assert rep.path == "fx" and rep.input_shape == list(shape)
    assert sum(rep.counts.values()) == sum(isinstance(m, BN) for m in model.modules())
    assert all(l.fold.startswith("folded") for l in rep.layers)

    folded = normsurgeon.fold(model, input_shape=shape, verify=True)
    assert not any(isinstance(m, BN) for m in folded.model.modules())
    with torch.no_grad():
        assert _rel(ref, folded.model(x)) <= 1e-5

    frozen = normsurgeon.convert(model, "frozen", input_shape=shape, verify=True)
    with torch.no_grad():
        assert _rel(ref, frozen.model(x)) <= 1e-5
    gnws = normsurgeon.convert(model, "gn+ws", input_shape=shape, verify=True)
    assert gnws.verification.batch_independent and not any(isinstance(m, BN) for m in gnws.model.modules())

    eq = normsurgeon.equalize(model, input_shape=shape, verify=True)
    with torch.no_grad():
        assert _rel(ref, eq.model(x)) <= 1e-5

    report = normsurgeon.export_onnx(model, tmp_path / f"{factory}.onnx", input_shape=(1, *shape[1:]),
                                     exporter="torchscript", verify=True)
    assert report.batchnorm_nodes == 0 and report.verification["ok"]


@pytest.mark.parametrize("factory, shape", [c for c in CASES if c[0] != "wave"], ids=["seq1d", "tab", "vol"])
def test_recalibrate_on_non_image_data(factory, shape):
    model = getattr(zoo, factory)().eval()
    data = torch.randn(16, *shape[1:]) * 3 + 1
    res = normsurgeon.recalibrate(model, data, batch_size=8, shuffle=False)
    bn = next(m for m in res.model.modules() if isinstance(m, BN))
    # independent: the first BN's input is the first conv/linear's output on the data
    first = next(m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))
    with torch.no_grad():
        h = first(data)
    dims = [0] + list(range(2, h.dim()))
    assert torch.allclose(bn.running_mean, h.mean(dims), atol=1e-4)


def test_keyword_defaults_are_bound_for_tracing():
    model = randomize_norm_stats(zoo.Seq1d()).eval()
    with pytest.raises(Exception):  # plain torch.fx stops on `if embed:`
        torch.fx.symbolic_trace(model)
    traced = try_trace(model)
    assert traced.ok, traced.error
    assert [n.op for n in traced.graph_module.graph.nodes].count("placeholder") == 1  # checks dropped
    res = normsurgeon.fold(model, input_shape=(2, 4, 32), verify=True)
    assert res.path == "fx"
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert _rel(model(x), res.model(x)) <= 1e-5
    with pytest.raises(TypeError):  # the bound keyword is gone, not silently ignored
        res.model(x, embed=True)


def test_cli_volume_and_audio(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # replaces run_cli's
    r = run_cli("fold", "nonimage_models:vol", "-o", str(tmp_path / "v.pt"), "--input-shape", "2,2,6,8,8",
                "--verify", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["info"]["remaining_batchnorm"] == 0
    # the default probe (N, 1, 128) is wrong for a raw-audio model: the message says what to pass
    r = run_cli("convert", "nonimage_models:wave", "--to", "gn+ws", "-o", str(tmp_path / "w.pt"), cwd=tmp_path, env=env)
    assert_one_error_line(r, "suggests N,C,L", "or N,L")
    r = run_cli("convert", "nonimage_models:wave", "--to", "gn+ws", "-o", str(tmp_path / "w.pt"), "--input-shape", "2,400",
                "--verify", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr


class ListOfImages(nn.Module):
    """Takes a list of (C, H, W) images, like torchvision's detection models in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, images):
        if not isinstance(images, list):
            raise TypeError("expected a list of images")
        x = torch.stack(images)
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_model_taking_a_list_of_images_is_probed_with_one():
    model = randomize_norm_stats(ListOfImages()).eval()
    res = normsurgeon.fold(model, input_shape=(2, 3, 8, 8), verify=True)
    assert res.path == "module-swap" and res.info["input_shape"] == [2, 3, 8, 8]
    images = [torch.randn(3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        assert _rel(model(images), res.model(images)) <= 1e-5
    conv = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 8, 8), verify=True)
    assert conv.verification.batch_independent
    assert normsurgeon.inspect(model, input_shape=(2, 3, 8, 8)).layers[0].fold.startswith("folded")
