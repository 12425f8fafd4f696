"""Replay is a closed schema: a file can only ask for structural steps with valid arguments, and a
malformed file is one error line (exit 2) that writes nothing."""
from __future__ import annotations

import json

import pytest
import torch

import normsurgeon
from normsurgeon.errors import ManifestError, RecipeError
from tests.security.files import FORMAT_KEY, cli, edit, edit_payload, manifest_of, one_error_line, write_model


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("genuine")
    return write_model(folder, "a.safetensors"), write_model(folder, "a.pt")


def test_export_step_in_a_file_never_writes(genuine, tmp_path):
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"precious")
    step = {"verb": "export_onnx", "args": {"path": str(victim), "force": True}}
    for src in genuine:
        evil = edit(src, lambda m: m["steps"].append(step), tmp_path / f"evil{src.suffix}")
        code, _, err = cli(["inspect", str(evil)])
        assert code == 2
        one_error_line(err, "export_onnx", "does not replay")
        assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "evil.safetensors", "victim.onnx"]


BAD_STEPS = [
    ({"verb": "load_model", "args": {}}, "does not replay"),
    ({"verb": "_private", "args": {}}, "does not replay"),
    ({"verb": "convert", "args": {"to": "gn", "bogus": 1}}, "unknown argument 'bogus'"),
    ({"verb": "convert", "args": {"to": 5}}, "recipe string"),
    ({"verb": "convert", "args": {"to": "nosuchrecipe"}}, "unknown recipe"),
    ({"verb": "convert", "args": {"to": "gn+ws", "ws_form": "bogus"}}, "must be one of var, std"),
    ({"verb": "convert", "args": {"to": "gn", "keep": "abc"}}, "list of strings"),
    ({"verb": "convert", "args": {"to": "gn", "input_shape": [-1, 3]}}, "positive integers"),
    ({"verb": "convert", "args": {"to": "gn", "layers": {"x": 3}}}, "recipe string"),
    ({"verb": "convert", "args": {"keep": []}}, "lacks argument 'to'"),
    ({"verb": "convert", "args": {"to": "gn", "replay": False}}, "cannot be marked replay"),
    ({"verb": "fold", "args": {"path": "/tmp/x"}}, "unknown argument 'path'"),
    ({"verb": "fold", "args": []}, "'args' must be an object"),
    ({"verb": 3, "args": {}}, "'verb' string"),
    ("convert", "'verb' string"),
]


@pytest.mark.parametrize("step,needle", BAD_STEPS, ids=[str(i) for i in range(len(BAD_STEPS))])
def test_bad_steps_are_one_error_line(genuine, tmp_path, step, needle):
    evil = edit(genuine[0], lambda m: m["steps"].append(step), tmp_path / "evil.safetensors")
    code, out, err = cli(["fold", str(evil), "-o", str(tmp_path / "out.pt")])
    assert code == 2 and out == ""
    one_error_line(err, needle)
    assert not (tmp_path / "out.pt").exists()


MALFORMED = [
    (lambda m: "{not json", "not JSON"),
    (lambda m: [1, 2], "a list, not an object"),
    (lambda m: m.pop("source") and None, "'source' must be"),
    (lambda m: m.update(source=7), "'source' must be"),
    (lambda m: m.update(steps={"verb": "fold"}), "'steps' must be a list"),
    (lambda m: m.update(extra=1), "unknown key 'extra'"),
    (lambda m: m.update(format_version="2"), "format_version"),
    (lambda m: m.update(format_version=99), "newer normsurgeon"),
    (lambda m: m.update(input_shape="1,3"), "'input_shape'"),
]


@pytest.mark.parametrize("change,needle", MALFORMED, ids=[n for _, n in MALFORMED])
def test_malformed_manifests(genuine, tmp_path, change, needle):
    evil = edit(genuine[0], change, tmp_path / "evil.safetensors")
    code, _, err = cli(["inspect", str(evil)])
    assert code == 2
    one_error_line(err, needle)


@pytest.mark.parametrize("change,needle", [
    (lambda p: p.update(state_dict=[1, 2]), "state_dict is not a mapping"),
    (lambda p: p["state_dict"].update(bad="text"), "state_dict is not a mapping"),
    (lambda p: p.pop("manifest"), "malformed normsurgeon file"),
    (lambda p: p.update(manifest="x"), "a str, not an object"),
    (lambda p: p.update({FORMAT_KEY: "1"}), "malformed normsurgeon file"),
])
def test_malformed_pt_payloads(genuine, tmp_path, change, needle):
    evil = edit_payload(genuine[1], change, tmp_path / "evil.pt")
    code, _, err = cli(["inspect", str(evil)])
    assert code == 2
    one_error_line(err, needle)


def test_version_1_files_load_through_the_same_validation(genuine, tmp_path):
    """A file written before the format carried a version (and input shape) still loads; a version-1
    file with a bad step is refused like any other."""
    def as_v1(m):
        m.pop("format_version")
        m.pop("input_shape")

    old = edit(genuine[1], as_v1, tmp_path / "old.pt")
    assert "format_version" not in manifest_of(old)
    model = normsurgeon.load_model(str(old))
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 3
    ref = normsurgeon.load_model(str(genuine[1]))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x), ref(x))

    def bad_v1(m):
        as_v1(m)
        m["steps"].append({"verb": "export_onnx", "args": {"path": "x.onnx"}})

    with pytest.raises(ManifestError, match="does not replay"):
        normsurgeon.load_model(str(edit(genuine[1], bad_v1, tmp_path / "bad.pt")))


def test_value_only_steps_are_history_never_run(genuine, tmp_path):
    """A recalibrate/equalize/distill step is kept in the history and never executed, whatever its
    arguments say."""
    step = {"verb": "recalibrate", "args": {"replay": False, "data": "/etc/passwd", "samples": 10**12}}
    f = edit(genuine[1], lambda m: m["steps"].append(step), tmp_path / "h.pt")
    model = normsurgeon.load_model(str(f))
    assert normsurgeon.provenance.get(model)["steps"][-1] == step


# ----------------------------------------------------------------------------- API options
def test_unknown_or_bad_convert_options_are_errors():
    m = normsurgeon.load_model("normsurgeon:digits_cnn")
    with pytest.raises(RecipeError, match="must be one of var, std"):
        normsurgeon.convert(m, "gn+ws", ws_form="bogus")
    with pytest.raises(RecipeError, match=r"unknown recipe option 'wsform'.*ws_form"):
        normsurgeon.convert(m, "gn+ws", wsform="std")
    with pytest.raises(RecipeError, match="does not apply to recipe ln"):
        normsurgeon.convert(m, "ln", ws_form="std")
    with pytest.raises(RecipeError, match="must be a finite positive number"):
        normsurgeon.convert(m, "ln+pn", pn_eps=float("nan"))
    res = normsurgeon.convert(m, "gn+ws", ws_form="std", input_shape=(2, 1, 16, 16))
    forms = {getattr(mod, "ws_form", None) for mod in res.model.modules()} - {None}
    assert forms == {"std"}
    assert json.loads(json.dumps(normsurgeon.provenance.get(res.model)))["steps"][-1]["args"]["ws_form"] == "std"
