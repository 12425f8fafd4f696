"""torchvision detection and segmentation through the CLI: fold verifies on features when the random
detector keeps no box (and says so), export refuses a detector up front with one error line and no
exporter output, a segmentation model's dict output exports and verifies."""
from __future__ import annotations

import json

import pytest

from tests.util import ROOT, assert_one_error_line, run_cli

DET = "tests.corpus_zoo:fasterrcnn_small"


@pytest.mark.slow  # tests/test_corpus.py runs the same fold through the API in the default run
def test_fold_detection_verifies_on_features(tmp_path):
    r = run_cli("fold", DET, "-o", str(tmp_path / "d.pt"), "--input-shape", "2,3,64,64", "--verify", "--json",
                cwd=ROOT)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    v = d["verification"]
    assert d["path"] == "module-swap" and d["info"]["remaining_batchnorm"] == 0
    assert v["ok"] and v["compared"].startswith("features at roi_heads.") and "empty" in v["note"]
    assert (tmp_path / "d.pt").exists()


def test_export_refuses_detection_in_one_line(tmp_path):
    out = tmp_path / "d.onnx"
    r = run_cli("export", DET, "-o", str(out), "--input-shape", "1,3,64,64", "--verify", cwd=ROOT)
    assert_one_error_line(r, "cannot export FasterRCNN", "detections per image")
    assert r.stdout == "" and not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_segmentation_dict_output_exports_verified(tmp_path):
    out = tmp_path / "s.onnx"
    r = run_cli("export", "torchvision:lraspp_mobilenet_v3_large", "-o", str(out), "--input-shape", "1,3,64,64",
                "--exporter", "torchscript", "--verify", "--json", cwd=tmp_path, real=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verification"]["ok"] and d["batchnorm_nodes"] == 0 and d["fold"]["path"] == "fx"
    assert r.stderr.strip() == ""  # no exporter chatter
