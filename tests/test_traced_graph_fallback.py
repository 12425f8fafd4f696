"""torch.fx can record a graph that is not the model: a branch on ``isinstance(skip, torch.Tensor)`` is
False for fx's Proxy, so the skip connection vanishes from the graph (what MONAI's BasicUNet does in
its UpCat block). Then the graph either fails at run time (the conv after the missing concat gets half
its channels) or runs and computes something else (a missing residual add). fold, convert, inspect and
export take the module-swap path on both, and say so; equalize reads its pairs off the autograd graph
instead, which sees the skip connection the traced graph lost. The models are built here, so the test needs no MONAI."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import normsurgeon
from tests.util import assert_one_error_line, randomize_norm_stats, run_cli

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class UpCat(nn.Module):
        """Concatenate the skip (when there is one), then conv-BN-ReLU."""

        def __init__(self, cin, cskip, cout):
            super().__init__()
            self.up = nn.ConvTranspose3d(cin, cin, 2, stride=2)
            self.conv = nn.Conv3d(cin + cskip, cout, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm3d(cout)

        def forward(self, x, skip=None):
            x = self.up(x)
            if isinstance(skip, torch.Tensor):  # False for an fx Proxy: the concat is not traced
                x = torch.cat([skip, x], dim=1)
            return torch.relu(self.bn(self.conv(x)))


    class TinyUNet3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU())
            self.down = nn.Sequential(nn.MaxPool3d(2), nn.Conv3d(4, 8, 3, padding=1, bias=False),
                                      nn.BatchNorm3d(8), nn.ReLU())
            self.up = UpCat(8, 4, 4)
            self.head = nn.Conv3d(4, 2, 1)

        def forward(self, x):
            e = self.enc(x)
            return self.head(self.up(self.down(e), e))


    class AddSkip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(3)
            self.head = nn.Conv2d(3, 5, 1)

        def forward(self, x, skip=None):
            y = self.bn(self.conv(x))
            skip = x if skip is None else skip
            if isinstance(skip, torch.Tensor):  # not traced: the graph runs without the residual add
                y = y + skip
            return self.head(torch.relu(y))


    def unet():
        return TinyUNet3d()


    def addskip():
        return AddSkip()
''')


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("fallback")
    (d / "skipnets.py").write_text(MODELS)
    import importlib
    import sys

    sys.path.insert(0, str(d))
    try:
        mod = importlib.import_module("skipnets")
        yield d, mod
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("skipnets", None)


def _eager_matches(a, b, x):
    with torch.no_grad():
        ra, rb = a(x), b(x)
    return ((ra - rb).abs().max() / ra.abs().max()).item()


@pytest.mark.parametrize("factory, shape, why", [("unet", (2, 1, 8, 8, 8), "fails"), ("addskip", (2, 3, 8, 8), "differs")])
def test_fold_and_convert_fall_back_to_module_swap(zoo, factory, shape, why):
    _, mod = zoo
    model = randomize_norm_stats(getattr(mod, factory)()).eval()
    # the premise: fx traces it, and the graph is not the model
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(shape)
    if why == "fails":
        with pytest.raises(RuntimeError):
            gm(x)
    else:
        assert _eager_matches(model, gm, x) > 1e-3

    res = normsurgeon.fold(model, input_shape=shape, verify=True)
    assert res.path == "module-swap"
    fallback = [c for c in res.changes if c.action == "fallback"]
    assert len(fallback) == 1 and why in fallback[0].detail
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in res.model.modules())
    assert _eager_matches(model, res.model, torch.randn(shape)) <= 1e-5  # an input fold never saw

    conv = normsurgeon.convert(model, "frozen", input_shape=shape, verify=True)
    assert conv.path == "module-swap" and conv.verification.max_rel_error <= 1e-5

    rep = normsurgeon.inspect(model, input_shape=shape)
    assert rep.traceable and rep.path == "module-swap" and why in rep.trace_error
    assert all(l.fold.startswith("folded") for l in rep.layers), [l.fold for l in rep.layers]

    eq = normsurgeon.equalize(model, input_shape=shape, verify=True)
    assert eq.path == "module-swap"
    assert [c.detail for c in eq.changes if c.action == "fallback"] and why in eq.changes[0].detail
    assert _eager_matches(model, eq.model, torch.randn(shape)) <= 1e-5
    assert eq.info["weight_norm_after"] <= eq.info["weight_norm_before"]
    skipped = {c.target: c.detail for c in eq.changes if c.action == "skipped"}
    paired = {c.target: c.detail for c in eq.changes if c.action == "equalized"}
    if factory == "unet":  # the encoder's output also feeds the concat the graph lost: tied, not balanced
        assert "concat" in skipped["enc.1"]
        assert paired == {"up.bn": "balanced against head"}
    else:  # the BN output feeds the residual add the graph lost
        assert "residual add" in skipped["bn"] and not paired


def test_cli_on_a_graph_that_fails(zoo, tmp_path):
    d, _ = zoo
    r = run_cli("fold", "skipnets:unet", "-o", str(tmp_path / "f.pt"), "--input-shape", "1,1,8,8,8", "--verify",
                "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == "module-swap" and out["info"]["remaining_batchnorm"] == 0 and out["verification"]["ok"]
    r = run_cli("export", "skipnets:unet", "-o", str(tmp_path / "u.onnx"), "--input-shape", "1,1,8,8,8",
                "--exporter", "torchscript", "--verify", "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    ex = json.loads(r.stdout)
    assert ex["fold"]["path"] == "module-swap" and ex["batchnorm_nodes"] == 0 and ex["verification"]["ok"]
    r = run_cli("equalize", "skipnets:unet", "-o", str(tmp_path / "e.pt"), "--input-shape", "1,1,8,8,8", "--verify",
                "--json", cwd=d)
    assert r.returncode == 0, r.stderr
    eq = json.loads(r.stdout)
    assert eq["path"] == "module-swap" and eq["info"]["pairs"] == 1 and eq["verification"]["ok"]


def test_wrong_shape_is_a_user_error_and_says_what_the_first_layer_takes(zoo, tmp_path):
    d, _ = zoo
    r = run_cli("fold", "skipnets:unet", "-o", str(tmp_path / "f.pt"), "--input-shape", "1,3,8,8", cwd=d)
    assert_one_error_line(r, "suggests N,C,D,H,W", "--input-shape 2,1,16,32,32")


def test_internal_failures_are_not_blamed_on_the_input_shape(zoo, monkeypatch):
    """A bug inside fold's swap path propagates as itself (an internal error), not as "--input-shape"."""
    _, mod = zoo
    import normsurgeon.passes.fold as fold_mod

    def broken(*a, **k):
        raise RuntimeError("bug in the swap path")

    monkeypatch.setattr(fold_mod, "_fold_swap", broken)
    with pytest.raises(RuntimeError, match="bug in the swap path"):
        normsurgeon.fold(mod.unet(), input_shape=(1, 1, 8, 8, 8))
