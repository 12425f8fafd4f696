"""A new user's first hour, through the real command line: their own model saved with torch.save,
a factory in the same folder, shapes given once, export and bench."""
import json
import subprocess
import sys

import onnx
import pytest

from tests.util import ROOT, assert_one_error_line, run_cli

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
