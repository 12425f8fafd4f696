"""Outputs: each verb refuses an extension it would not honour (before loading anything, writing nothing),
saved models get the file mode a plain open() gives, and a factory spec that fails is a user error."""
from __future__ import annotations

import os
import textwrap

import pytest

import normsurgeon
from normsurgeon.errors import OutputExistsError
from tests.util import ROOT, assert_one_error_line, run_cli

DIGITS = "normsurgeon:digits_cnn"



def listing(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def dirs(tmp_path):
    """(work folder, env) with a user module ``ns_fmt_nets`` on PYTHONPATH (outside the work folder)."""
    mods, work = tmp_path / "mods", tmp_path / "work"
    mods.mkdir()
    work.mkdir()
    (mods / "ns_fmt_nets.py").write_text(textwrap.dedent(f"""
        import pathlib
        from torch import nn

        def small():
            pathlib.Path({str(tmp_path / "loaded")!r}).touch()  # proves the model was (not) built
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def broken():
            raise ValueError("bad config")

        def not_a_model():
            return {{"layers": 3}}
    """))
    (mods / "ns_fmt_bad_import.py").write_text("raise RuntimeError('no GPU config found')\n")
    return work, {"PYTHONPATH": f"{mods}{os.pathsep}{ROOT}"}


SHAPE = ["--input-shape", "1,3,8,8"]
MODEL_VERBS = [
    ["convert", "ns_fmt_nets:small", "--to", "gn", *SHAPE],
    ["fold", "ns_fmt_nets:small", *SHAPE],
    ["equalize", "ns_fmt_nets:small", *SHAPE],
    ["recalibrate", "ns_fmt_nets:small", "--data", "digits:train"],
]


CASES = [(args, "x.onnx") for args in MODEL_VERBS] + [(MODEL_VERBS[0], "x.ONNX")]


@pytest.mark.parametrize("args,name", CASES, ids=[f"{a[0]}-{n}" for a, n in CASES])
def test_model_verbs_refuse_onnx_output_before_loading(dirs, args, name):
    work, env = dirs
    proc = run_cli(*args, "-o", name, cwd=work, env=env)
    assert_one_error_line(proc, name, ".pt or .safetensors", "normsurgeon export")
    assert listing(work) == []
    assert not (work.parent / "loaded").exists()  # refused before the model was built


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors", "x", "x.onnx.bak"])
def test_export_refuses_non_onnx_output_before_loading(dirs, name):
    work, env = dirs
    proc = run_cli("export", "ns_fmt_nets:small", "-o", name, *SHAPE, cwd=work, env=env)
    assert_one_error_line(proc, name, ".onnx")
    assert listing(work) == []
    assert not (work.parent / "loaded").exists()


def test_wrong_extension_refused_even_with_force(dirs):
    work, env = dirs
    (work / "x.onnx").write_bytes(b"keep me")
    proc = run_cli("convert", "ns_fmt_nets:small", "--to", "gn", "-o", "x.onnx", "--force", cwd=work, env=env)
    assert_one_error_line(proc, ".pt or .safetensors")
    assert (work / "x.onnx").read_bytes() == b"keep me" and listing(work) == ["x.onnx"]


def test_api_save_model_refuses_onnx(tmp_path):
    model = normsurgeon.load_model(DIGITS)
    with pytest.raises(OutputExistsError, match="normsurgeon export"):
        normsurgeon.save_model(model, tmp_path / "m.onnx")
    with pytest.raises(OutputExistsError, match=r"\.onnx"):
        normsurgeon.export_onnx(model, tmp_path / "m.pt", input_shape=(1, 1, 16, 16))
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name,umask", [("m.pt", 0o022), ("m.pt", 0o002), ("m.safetensors", 0o022)])
def test_saved_model_mode_follows_umask(tmp_path, umask, name):
    previous = os.umask(umask)  # the CLI subprocess inherits it
    try:
        proc = run_cli("convert", DIGITS, "--to", "frozen", "-o", name, cwd=tmp_path)
    finally:
        os.umask(previous)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert listing(tmp_path) == [name]  # no temp file left
    model = normsurgeon.load_model(str(tmp_path / name))  # and it still loads back
    assert any(type(m).__name__ == "FrozenBatchNorm" for m in model.modules())


SPEC_ERRORS = [
    ("ns_fmt_nets:broken", ["calling ns_fmt_nets:broken() failed", "ValueError: bad config", "no arguments"]),
    ("json:loads", ["calling json:loads() failed", "TypeError", "no arguments"]),
    ("ns_fmt_nets:not_a_model", ["ns_fmt_nets:not_a_model() returned dict", "torch.nn.Module"]),
    ("ns_fmt_bad_import:make", ["importing ns_fmt_bad_import", "RuntimeError: no GPU config found"]),
]


@pytest.mark.parametrize("spec,needles", SPEC_ERRORS, ids=[s for s, _ in SPEC_ERRORS])
def test_failing_factory_spec_is_a_user_error(dirs, spec, needles):
    work, env = dirs
    proc = run_cli("convert", spec, "--to", "gn", "-o", "out.pt", cwd=work, env=env)
    assert_one_error_line(proc, *needles)
    assert listing(work) == []
