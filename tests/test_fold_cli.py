"""`normsurgeon fold` and `normsurgeon export` end to end through the CLI (subprocesses)."""
from __future__ import annotations

import json

import onnx
import torch

import normsurgeon
from tests.util import run_cli


def test_cli_fold_json_saves_replayable_model(tmp_path):
    out = tmp_path / "f.pt"
    r = run_cli("fold", "torchvision:resnet18", "-o", str(out), "--input-shape", "1,3,32,32", "--verify", "--json",
                cwd=tmp_path, real=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verb"] == "fold" and d["path"] == "fx" and d["summary"] == {"folded": 20}
    assert d["verification"]["ok"] and d["info"]["remaining_batchnorm"] == 0
    folded = normsurgeon.load_model(str(out))  # rebuilt from the spec + replayed fold + weights
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_cli_export_verify_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "m.onnx"
    args = ("export", "torchvision:mobilenet_v3_small", "-o", str(out), "--input-shape", "1,3,32,32",
            "--exporter", "torchscript", "--verify")
    r = run_cli(*args, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["verification"]["ok"] and d["batchnorm_nodes"] == 0 and d["constant_nodes"] == 0
    onnx.checker.check_model(str(out))
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "--force" in r.stderr
