"""export --opset: the file's opset is the one asked for. Below 18 the TorchScript exporter runs (torch's
dynamo exporter silently writes opset 18 for lower requests); a forced exporter that cannot write the
opset is one error line; the report never names an opset the file does not have."""
from __future__ import annotations

import json

import onnx
import pytest

import normsurgeon
from normsurgeon.calibrate.digits_cnn import SPEC as DIGITS
from normsurgeon.deploy import export as export_mod
from normsurgeon.deploy.export import ExportError
from tests.util import assert_one_error_line, randomize_norm_stats, run_cli

SHAPE = (1, 1, 16, 16)


def file_opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))



@pytest.fixture(scope="module")
def digits():
    return randomize_norm_stats(normsurgeon.load_model(DIGITS)).eval()


@pytest.mark.parametrize("opset,exporter", [(7, "torchscript"), (11, "torchscript"), (17, "torchscript"),
                                            (18, "dynamo"), (20, "dynamo")])
def test_file_opset_is_the_requested_one(tmp_path, digits, opset, exporter):
    out = tmp_path / "m.onnx"
    rep = normsurgeon.export_onnx(digits, out, input_shape=SHAPE, opset=opset, verify=True)
    assert file_opset(out) == opset == rep.opset
    assert rep.exporter == exporter and rep.verification["ok"]
    below = [n for n in rep.notes if "TorchScript" in n]
    assert bool(below) == (opset < 18), rep.notes


@pytest.mark.parametrize("opset", [11, 17])
def test_groupnorm_model_at_low_opset_verifies(tmp_path, opset):
    model = normsurgeon.convert(normsurgeon.load_model(DIGITS), to="gn", input_shape=SHAPE).model
    out = tmp_path / "gn.onnx"
    rep = normsurgeon.export_onnx(model, out, input_shape=SHAPE, opset=opset, verify=True)
    assert file_opset(out) == opset and rep.exporter == "torchscript"
    assert rep.groupnorm_nodes == 3 and rep.nodes["InstanceNormalization"] == 3
    assert rep.verification["ok"], rep.verification


def test_opset_mismatch_is_an_error_and_writes_nothing(tmp_path, digits, monkeypatch):
    """The old bug: auto ran dynamo at opset 17 and reported 17 for an opset-18 file."""
    monkeypatch.setattr(export_mod, "DYNAMO_MIN_OPSET", 7)
    with pytest.raises(ExportError, match="opset 18, not the requested 17") as e:
        normsurgeon.export_onnx(digits, tmp_path / "m.onnx", input_shape=SHAPE, opset=17)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needles", [
    (["--opset", "11", "--exporter", "dynamo"], ["dynamo exporter", "18", "--exporter torchscript"]),
    (["--opset", "21", "--exporter", "torchscript"], ["TorchScript exporter", "20"]),
])
def test_cli_exporter_that_cannot_write_the_opset_fails_in_one_line(tmp_path, args, needles):
    proc = run_cli("export", DIGITS, "-o", "m.onnx", *args, cwd=tmp_path)
    assert_one_error_line(proc, *needles)
    assert list(tmp_path.iterdir()) == []


def test_groupnorm_nchw_form_needs_opset_13(tmp_path, digits):
    with pytest.raises(ExportError, match="opset 13"):
        normsurgeon.export_onnx(digits, tmp_path / "m.onnx", input_shape=SHAPE, opset=11, groupnorm="nchw")
    assert list(tmp_path.iterdir()) == []


def test_cli_low_opset_report_names_the_exporter_and_why(tmp_path):
    proc = run_cli("export", DIGITS, "-o", "m.onnx", "--opset", "11", "--verify", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["opset"] == 11 and d["exporter"] == "torchscript" and d["verification"]["ok"]
    assert any("dynamo exporter writes opset 18" in n for n in d["notes"]), d["notes"]
    assert file_opset(tmp_path / "m.onnx") == 11
