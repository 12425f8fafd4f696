"""recalibrate and evaluate trust the model about the data's per-sample shape: flat (N, 256) data
for a model that reshapes it itself runs through the real CLI; data the model cannot take is one
error line quoting why; an out-of-memory error is not reported as a data problem."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.errors import DataError
from tests.util import assert_one_error_line, run_cli

FACTORY = """
import torch
from torch import nn


def flat_digits():
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 16, 16)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
"""


def test_flat_data_for_a_model_that_reshapes_it(tmp_path):
    (tmp_path / "flatnet.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "flat.npz", x=rng.standard_normal((64, 256)).astype(np.float32),
             y=rng.integers(0, 10, 64))
    out = tmp_path / "r.pt"
    r = run_cli("recalibrate", "flatnet:flat_digits", "--data", "flat.npz", "-o", str(out), "--batch-size", "16",
                "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["info"]["samples"] == 64
    e = run_cli("evaluate", str(out), "--data", "flat.npz", "--json", "--trust-code", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["samples"] == 64
    # the same data with a feature count the model cannot reshape: one line quoting the model's reason
    np.savez(tmp_path / "bad.npz", x=np.zeros((64, 100), np.float32))
    bad = run_cli("recalibrate", "flatnet:flat_digits", "--data", "bad.npz", "-o", str(tmp_path / "b.pt"),
                  cwd=tmp_path)
    assert_one_error_line(bad, "cannot run on data batches of shape (2, 100)", "unflatten")
    assert not (tmp_path / "b.pt").exists()


class OutOfMemory(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_not_a_data_error():
    with pytest.raises(torch.OutOfMemoryError):
        normsurgeon.recalibrate(OutOfMemory(), torch.randn(8, 2, 4, 4), batch_size=4)
    with pytest.raises(DataError, match="cannot run on data"):
        normsurgeon.recalibrate(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), torch.randn(8, 2, 4, 4),
                                batch_size=4)
