"""Verification is never vacuous and never blind to NaN: an empty/constant/all-zero reference output is
compared at the deepest informative feature map instead (and the report says where); a NaN/inf
reference or result, or nothing informative to compare, fails `--verify` with exit 3."""
from __future__ import annotations

import copy
import json
import textwrap

import torch
from torch import nn

import normsurgeon
from normsurgeon.graph.verify import compare, output_error
from tests.util import randomize_norm_stats, run_cli


class ZeroHead(nn.Module):
    """conv-BN-ReLU features, then a head whose weights are all zero: the output is all zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


def test_zero_output_is_compared_at_the_deepest_feature_map():
    model = randomize_norm_stats(ZeroHead()).eval()
    res = normsurgeon.fold(model, input_shape=(2, 3, 8, 8), verify=True)
    v = res.verification
    assert v.ok and v.problem is None
    assert v.compared == "features at pool", v  # the deepest unchanged module with a non-constant output
    assert "all zero" in v.note
    # the feature comparison can fail: a wrong "fold" (BN mean shifted) is caught there, though the
    # output (all zero) is identical
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.bn.running_mean += 0.5
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), broken(x))
    bad = compare(model, broken, x, 1e-5)
    assert not bad.ok and bad.compared == "features at pool" and bad.max_rel_error > 1e-3


class Silent(nn.Module):
    """Every leaf module changes under fold and the output is constant: nothing left to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * 0.0 + 1.0


def test_nothing_to_compare_is_not_a_pass():
    res = normsurgeon.fold(randomize_norm_stats(Silent()).eval(), input_shape=(1, 3, 8, 8))
    assert not res.verification.ok
    assert res.verification.problem.startswith("cannot verify: the model's output is constant")


def test_nan_in_the_result_never_compares_small():
    r = torch.ones(2, 3)
    n = r.clone()
    n[0, 0] = float("nan")
    assert output_error(r, n) == (float("inf"), float("inf"))
    assert output_error([torch.zeros(0, 4)], [torch.zeros(0, 4)]) == (0.0, 0.0)


FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def nan_weights():
        m = net()
        with torch.no_grad():
            m[0].weight[0, 0, 0, 0] = float("nan")
        return m

    def negative_var():
        m = net()
        with torch.no_grad():
            m[1].running_var[2] = -1.0
        return m

    def silent():
        class S(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, padding=1)
                self.bn = nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.conv(x)) * 0.0
        return S()
""")


def _fold(tmp_path, name, *extra):
    (tmp_path / "zoo_bad.py").write_text(FACTORIES)
    return run_cli("fold", f"zoo_bad:{name}", "-o", str(tmp_path / f"{name}.pt"), "--input-shape", "2,3,8,8",
                   *extra, cwd=tmp_path)


def test_cli_fold_verify_fails_on_nan_and_negative_running_var(tmp_path):
    for name in ("nan_weights", "negative_var"):
        r = _fold(tmp_path, name, "--verify")
        assert r.returncode == 3, (name, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: fold: cannot verify"), r.stderr
        assert "not finite" in lines[0]
        assert not (tmp_path / f"{name}.pt").exists()


def test_cli_fold_verify_fails_when_nothing_is_comparable(tmp_path):
    r = _fold(tmp_path, "silent", "--verify")
    assert r.returncode == 3 and "cannot verify" in r.stderr, r.stderr
    r = _fold(tmp_path, "silent", "--json")  # without --verify: written, the report says why not verified
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verification"]
    assert v["ok"] is False and v["compared"] == "nothing" and "all zero" in v["problem"]


def test_cli_reports_what_was_compared(tmp_path):
    r = _fold(tmp_path, "net", "--verify", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["verification"]
    assert v["compared"] == "output" and v["ok"]


def test_export_verify_refuses_to_compare_a_constant_output(tmp_path):
    """ONNX Runtime returns outputs only: an all-zero output cannot verify the graph, so --verify fails
    and nothing is written."""
    import pytest

    from normsurgeon.errors import VerificationError

    out = tmp_path / "z.onnx"
    with pytest.raises(VerificationError, match="cannot verify the ONNX graph.*all zero"):
        normsurgeon.export_onnx(randomize_norm_stats(ZeroHead()).eval(), out, input_shape=(1, 3, 8, 8),
                                exporter="torchscript", verify=True)
    assert not out.exists()


def test_numerically_zero_output_is_compared_on_features():
    """A head whose weights are ~1e-14 (timm lcnetv2_small's output is ~6e-13 at random init) gives
    rounding noise, not a signal: the check moves to the features."""
    model = randomize_norm_stats(ZeroHead()).eval()
    with torch.no_grad():
        model.head.weight.fill_(1e-14)
    res = normsurgeon.fold(model, input_shape=(2, 3, 8, 8), verify=True)
    assert res.verification.compared == "features at pool"
    assert "numerically zero" in res.verification.note
