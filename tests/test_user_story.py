"""A new user's first hour, through the real command line: their own model saved with torch.save,
a factory in the same folder, shapes given once, export and bench."""
import json
import subprocess
import sys

import onnx
import pytest

from tests.util import assert_one_error_line
from tests.util import run_cli as _run_cli

MYMODELS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def build():
    return TinyNet()
'''


def run_cli(*args, **kw):
    """A user's story runs the real command in a fresh interpreter each time."""
    return _run_cli(*args, real=True, **kw)


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    subprocess.run([sys.executable, "-c", "import torch, mymodels; torch.save(mymodels.TinyNet(), 'model.pt')"],
                   cwd=tmp_path, check=True, timeout=300)
    return tmp_path


def test_trust_pickle_finds_classes_next_to_the_file(folder, tmp_path_factory):
    proc = run_cli("inspect", "model.pt", "--trust-pickle", "--input-shape", "2,1,16,16", "--json", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert [layer["type"] for layer in json.loads(proc.stdout)["layers"]] == ["BatchNorm2d", "BatchNorm2d"]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = run_cli("inspect", str(folder / "model.pt"), "--trust-pickle", cwd=elsewhere)
    assert_one_error_line(proc, "'mymodels'", "PYTHONPATH")
    proc = run_cli("inspect", "model.pt", cwd=folder)  # and without the opt-in, nothing is unpickled
    assert_one_error_line(proc, "--trust-pickle")


def test_shape_given_once_reaches_export_and_bench(folder):
    proc = run_cli("convert", "mymodels:build", "--to", "gn+ws", "-o", "out/c.pt", "--input-shape", "2,1,16,16",
                   cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert (folder / "out" / "c.pt").is_file() and "created folder out" in proc.stdout  # and said so
    proc = run_cli("export", "out/c.pt", "-o", "out/c.onnx", "--trust-code", "--verify", "--json", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["input_shape"] == [1, 1, 16, 16] and rep["input_shape_from"] == "recorded" and rep["dynamic_batch"]
    dims = onnx.load(str(folder / "out" / "c.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # a symbolic batch
    assert [d.dim_value for d in dims[1:]] == [1, 16, 16]
    proc = run_cli("bench", "out/c.onnx", "--batch-size", "1,8,32", "--runs", "2", "--warmup", "0", "--json",
                   cwd=folder)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert sorted({r["batch"] for r in rows}) == [1, 8, 32]


@pytest.mark.slow
def test_fold_of_densenet_prints_a_short_summary(tmp_path):
    proc = run_cli("fold", "torchvision:densenet121", "-o", "d.pt", cwd=tmp_path, env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) < 15, proc.stdout
    assert "59 folded, 62 affine" in proc.stdout and "remaining BatchNorm: 0" in proc.stdout
