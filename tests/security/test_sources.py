"""A manifest's source is data: only zoo names load freely; code it names runs only with --trust-code.

Each attack is a file normsurgeon wrote, edited as an attacker would. The dangerous ones run in a
real subprocess (an abort, an exit or a server would take the test process with them)."""
from __future__ import annotations

import time

import pytest

from tests.security.files import cli, edit, manifest_of, one_error_line, run_cli, write_model
from tests.util import assert_one_error_line

PLANTED = '''
from pathlib import Path
Path(__file__).with_name("PLANTED_RAN").write_text("imported")
import torch

def build():
    Path(__file__).with_name("PLANTED_BUILT").write_text("called")
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
'''


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("genuine")
    return write_model(folder, "a.safetensors"), write_model(folder, "a.pt")


def _attack(genuine, folder, suffix, source):
    src = genuine[0] if suffix == ".safetensors" else genuine[1]
    return edit(src, lambda m: m.update(source=source), folder / f"evil{suffix}")


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("source", ["os:abort", "builtins:exit", "http.server:test", "antigravity:geohash"])
def test_file_naming_code_is_refused_in_a_subprocess(genuine, tmp_path, source):
    evil = _attack(genuine, tmp_path, ".safetensors", source)
    t = time.monotonic()
    proc = run_cli("inspect", str(evil), cwd=tmp_path, timeout=120)
    assert time.monotonic() - t < 120
    assert_one_error_line(proc, source, "--trust-code")
    assert _listing(tmp_path) == ["evil.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_planted_module_next_to_the_file_is_never_imported(genuine, tmp_path, suffix):
    (tmp_path / "planted_mod.py").write_text(PLANTED)
    evil = _attack(genuine, tmp_path, suffix, "planted_mod:build")
    proc = run_cli("fold", evil.name, "-o", "out.pt", cwd=tmp_path)
    assert_one_error_line(proc, "planted_mod:build", "--trust-code")
    assert _listing(tmp_path) == sorted(["planted_mod.py", evil.name])  # no marker, no output


def test_trust_code_imports_the_named_factory(genuine, tmp_path):
    """The positive control: the same kind of file loads once the user opts in (and only then runs it)."""
    (tmp_path / "planted_mod.py").write_text(PLANTED)
    evil = _attack(genuine, tmp_path, ".safetensors", "planted_mod:build")
    evil.unlink()  # a legitimate file built by the factory, written by normsurgeon itself
    proc = run_cli("convert", "planted_mod:build", "--to", "gn", "-o", "a.safetensors", "--input-shape", "1,1,8,8",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("PLANTED_RAN", "PLANTED_BUILT"):
        (tmp_path / name).unlink()
    proc = run_cli("fold", "a.safetensors", "-o", "b.pt", cwd=tmp_path)
    assert_one_error_line(proc, "--trust-code")
    assert not (tmp_path / "PLANTED_RAN").exists() and not (tmp_path / "b.pt").exists()
    proc = run_cli("fold", "a.safetensors", "-o", "b.pt", "--trust-code", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "PLANTED_BUILT").exists() and (tmp_path / "b.pt").exists()
    assert manifest_of(tmp_path / "b.pt")["source"] == "planted_mod:build"


def test_zoo_sources_load_without_any_flag(tmp_path):
    code, _, err = cli(["convert", "torchvision:resnet18", "--to", "frozen", "-o", str(tmp_path / "b.pt")])
    assert code == 0, err
    code, _, err = cli(["fold", str(tmp_path / "b.pt"), "-o", str(tmp_path / "c.pt"), "--verify"])
    assert code == 0, err
    m = manifest_of(tmp_path / "c.pt")
    assert m["source"] == "torchvision:resnet18" and [s["verb"] for s in m["steps"]] == ["convert", "fold"]
    assert m["format_version"] == 2 and m["input_shape"] == [2, 3, 224, 224]


@pytest.mark.parametrize("source", ["timm:hf-hub:someone/evil", "torchvision:../../x", "timm:local-dir:/tmp/x",
                                    "normsurgeon:os"])
def test_zoo_names_are_registry_names_only(genuine, tmp_path, source):
    evil = _attack(genuine, tmp_path, ".pt", source)
    code, _, err = cli(["inspect", str(evil)])
    assert code == 2
    one_error_line(err)


def test_typed_factory_exit_is_an_error_not_success(tmp_path):
    """A factory that calls exit() (SystemExit) is a failed model spec, not a silent exit 0."""
    (tmp_path / "quits.py").write_text("import sys\ndef build():\n    sys.exit(0)\n")
    proc = run_cli("convert", "quits:build", "--to", "gn", "-o", "x.pt", cwd=tmp_path)
    assert_one_error_line(proc, "SystemExit", "quits:build")
    assert not (tmp_path / "x.pt").exists()
