"""recalibrate / evaluate through the real CLI: outputs, --json, and bad data (one error line, nothing written)."""
import json

import numpy as np
import pytest
import torch

from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.model_io import load_model, save_model
from tests.util import run_cli


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "digits.pt"
    save_model(train_digits_cnn(0), path)
    return path


def test_recalibrate_then_evaluate_same_noise_instance(model_file, tmp_path):
    out = tmp_path / "out.pt"
    r = run_cli("recalibrate", str(model_file), "--data", "digits:train", "-o", str(out), "--noise", "weight:0.1",
                "--noise-seed", "5", "--samples", "640", "--batch-size", "64", "--json", real=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar (nor its blank line) when stderr is not a terminal
    rep = json.loads(r.stdout)
    assert rep["verb"] == "recalibrate" and rep["summary"] == {"recalibrated": 3} and rep["info"]["samples"] == 640
    import normsurgeon

    api = normsurgeon.recalibrate(load_model(str(model_file)), "digits:train", noise="weight:0.1", noise_seed=5,
                                  samples=640, batch_size=64).model
    saved = load_model(str(out))
    for k, v in api.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    e = run_cli("evaluate", str(out), "--data", "digits:test", "--noise", "weight:0.1", "--noise-seed", "5", "--json", real=True)
    assert e.returncode == 0, e.stderr
    assert e.stderr == ""
    got = json.loads(e.stdout)
    want = normsurgeon.evaluate(api, "digits:test", noise="weight:0.1", noise_seed=5)
    assert abs(got["accuracy"] - want["accuracy"]) <= 1 / 359 and got["samples"] == 359 and got["accuracy"] >= 0.95


def _bad(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case", ["channels", "rank", "nan", "few", "empty", "labels"])
def test_bad_data_one_error_line_nothing_written(model_file, tmp_path, case):
    out = tmp_path / "out.pt"
    f32 = np.float32
    if case == "channels":
        data, match = _bad(tmp_path, "c.npz", x=np.zeros((40, 3, 16, 16), f32)), "3 channels"
    elif case == "rank":
        data, match = _bad(tmp_path, "r.npz", x=np.zeros((40, 16, 16), f32)), "shape"
    elif case == "nan":
        x = np.zeros((40, 1, 16, 16), f32)
        x[7, 0, 3, 3] = np.nan
        data, match = _bad(tmp_path, "n.npz", x=x), "NaN/Inf"
    elif case == "few":
        data, match = _bad(tmp_path, "f.npz", x=np.zeros((5, 1, 16, 16), f32)), "fewer than one batch"
    elif case == "empty":
        (tmp_path / "imgs").mkdir()
        data, match = str(tmp_path / "imgs"), "no images"
    if case == "labels":
        data = _bad(tmp_path, "l.npz", x=np.zeros((40, 1, 16, 16), f32))
        r = run_cli("evaluate", str(model_file), "--data", data)
        match = "no labels"
    else:
        r = run_cli("recalibrate", str(model_file), "--data", data, "-o", str(out))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    assert not list(tmp_path.glob(".out.pt*"))


def _no_compiler_env() -> dict:
    import os
    import sys

    return {"CC": "false", "CXX": "false", "PATH": os.path.dirname(sys.executable)}


def test_every_statistics_path_needs_no_compiler(model_file, tmp_path):
    """No C compiler anywhere: recalibrate (the verb that once compiled a kernel) and evaluate run in a
    fresh interpreter with CC=false and a PATH holding only the interpreter's folder."""
    env = _no_compiler_env()
    out = tmp_path / "r.pt"
    r = run_cli("recalibrate", str(model_file), "--data", "digits:train", "--samples", "128", "-o", str(out),
                "--json", env=env, real=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"] == {"recalibrated": 3}
    e = run_cli("evaluate", str(out), "--data", "digits:test", "--json", env=env, real=True)
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["accuracy"] > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["inspect", "convert", "fold", "equalize", "export", "bench", "distill", "diagnose"])
def test_every_verb_needs_no_compiler(model_file, tmp_path, verb):
    """The other verbs, each in a fresh interpreter with no compiler reachable."""
    shape = ["--input-shape", "2,1,16,16"]
    out = ["-o", str(tmp_path / ("o.onnx" if verb == "export" else "o.pt"))]
    argv = {
        "inspect": ["inspect", str(model_file), *shape, "--json"],
        "convert": ["convert", str(model_file), "--to", "gn+ws", *shape, *out, "--json"],
        "fold": ["fold", str(model_file), *shape, *out, "--verify", "--json"],
        "equalize": ["equalize", str(model_file), *shape, *out, "--verify", "--json"],
        "export": ["export", str(model_file), *shape, *out, "--verify", "--json"],
        "bench": ["bench", str(model_file), *shape, "--runs", "2", "--warmup", "0", "--batch-size", "1", "--json"],
        "distill": ["distill", str(model_file), "--teacher", str(model_file), "--data", "digits:train", "--steps", "2",
                    *out, "--json"],
        "diagnose": ["diagnose", str(model_file), "--data", "digits:test", "--samples", "64", "--json"],
    }[verb]
    r = run_cli(*argv, env=_no_compiler_env(), real=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["verb"] == verb
