"""Data-parallel recalibration: torchrun, 2 gloo processes on CPU, equal to a single-process run."""
import json
import os
import subprocess
import sys

import torch

import normsurgeon
from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.model_io import load_model, save_model
from tests.util import ROOT


def test_torchrun_two_processes_equal_single_process(tmp_path):
    src, out = tmp_path / "digits.pt", tmp_path / "dp.pt"
    save_model(train_digits_cnn(0), src)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="200",
               OMP_NUM_THREADS="1")
    # 230 samples in batches of 32: 7 batches (the remainder joins the last), split 4 + 3 over the ranks;
    # resampled noise must follow the batch, not the rank
    args = ["--data", "digits:train", "--samples", "230", "--batch-size", "32", "--noise", "weight:0.1",
            "--noise-mode", "resample", "--noise-samples", "2", "--noise-seed", "3"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        "-m", "normsurgeon", "recalibrate", str(src), *args, "-o", str(out), "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["info"]["world_size"] == 2 and rep["info"]["samples"] == 230 and r.stdout.count('"verb"') == 1  # rank 0 prints

    single = normsurgeon.recalibrate(load_model(str(src)), "digits:train", samples=230, batch_size=32,
                                     noise="weight:0.1", noise_mode="resample", noise_samples=2, noise_seed=3).model
    dp = load_model(str(out)).state_dict()
    changed = 0
    for k, v in single.state_dict().items():
        torch.testing.assert_close(dp[k], v, rtol=1e-6, atol=1e-6)
        changed += k.endswith("running_var")
    assert changed == 3
    # and the statistics really moved away from the trained ones
    assert not torch.allclose(dp["1.running_var"], load_model(str(src)).state_dict()["1.running_var"])
