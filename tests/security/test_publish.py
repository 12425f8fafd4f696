"""Publishing never clobbers: the overwrite check holds at publish time, --force keeps the old mode,
killed runs leave nothing behind for long, and the machine's refusals are exit 4."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import normsurgeon
from normsurgeon.errors import EnvironmentProblem, OutputExistsError
from normsurgeon.publish import check_output, publish, remove_stale
from tests.security.files import MODEL, cli, one_error_line, run_cli
from tests.util import ROOT, assert_one_error_line

SLOW_FACTORY = '''
import os, time
from pathlib import Path
import torch

def appears():
    """Builds the model, and meanwhile something else writes the output the user asked for."""
    Path(os.environ["NS_TEST_OUT"]).write_text("someone else's file")
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
'''


def test_file_appearing_during_the_run_is_not_replaced(tmp_path):
    (tmp_path / "racy.py").write_text(SLOW_FACTORY)
    out = tmp_path / "out.pt"
    proc = run_cli("convert", "racy:appears", "--to", "gn", "-o", "out.pt", "--input-shape", "1,1,8,8",
                   cwd=tmp_path, env={"NS_TEST_OUT": str(out)})
    assert_one_error_line(proc, "out.pt", "--force")
    assert out.read_text() == "someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("__")) == ["out.pt", "racy.py"]


def test_publish_refuses_what_appeared_and_leaves_no_temp(tmp_path):
    out = tmp_path / "m.pt"

    def write(tmp):
        open(tmp, "w").write("new")
        out.write_text("old")  # another process wins the race

    with pytest.raises(OutputExistsError, match="appeared"):
        publish(out, write)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    publish(out, lambda tmp: open(tmp, "w").write("new"), force=True)
    assert out.read_text() == "new"


def test_dangling_symlink_is_not_replaced_without_force(tmp_path):
    out = tmp_path / "m.pt"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="--force"):
        check_output(out)
    with pytest.raises(OutputExistsError, match="appeared"):
        publish(out, lambda tmp: open(tmp, "w").write("x"))
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    publish(out, lambda tmp: open(tmp, "w").write("x"), force=True)
    assert not out.is_symlink() and out.read_text() == "x"


def test_force_keeps_the_old_files_mode(tmp_path):
    m = normsurgeon.load_model(MODEL)
    out = tmp_path / "m.pt"
    normsurgeon.save_model(m, out)
    os.chmod(out, 0o600)
    normsurgeon.save_model(m, out, force=True)
    assert out.stat().st_mode & 0o777 == 0o600


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".m.pt.{dead_pid}.0123abcd.tmp"
    stale_dir = tmp_path / f".m.pt.{dead_pid}.89abcdef.tmpdir"
    live = tmp_path / f".m.pt.{os.getppid()}.0123abcd.tmp"  # a live process (pytest's parent)
    other = tmp_path / f".n.pt.{dead_pid}.0123abcd.tmp"  # another output's: not ours to touch
    for p in (stale, live, other):
        p.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "m.pt").write_text("x")
    assert sorted(p.name for p in remove_stale(tmp_path / "m.pt")) == sorted([stale.name, stale_dir.name])
    assert live.exists() and other.exists() and not stale.exists() and not stale_dir.exists()


def test_sigkill_during_save_leaves_nothing_after_the_next_run(tmp_path):
    """A run killed while writing leaves its temp file; the next run for that output removes it."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import normsurgeon, torch
m = normsurgeon.load_model({MODEL!r})
orig = torch.save
def save_then_die(obj, f, *a, **k):
    orig(obj, f, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
normsurgeon.save_model(m, {str(tmp_path / 'm.pt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.pt.") and left[0].endswith(".tmp")
    normsurgeon.save_model(normsurgeon.load_model(MODEL), tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_full_disk_is_an_environment_error(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, _, err = cli(["convert", MODEL, "--to", "gn", "-o", str(tmp_path / "m.pt")])
    assert code == 4
    one_error_line(err, "No space left on device", "m.pt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EnvironmentProblem):
        normsurgeon.save_model(normsurgeon.load_model(MODEL), tmp_path / "m.pt")


def test_out_of_memory_is_an_environment_error(tmp_path, monkeypatch):
    import normsurgeon.passes.convert as conv

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(conv, "resolve", oom)
    code, _, err = cli(["convert", MODEL, "--to", "gn", "-o", str(tmp_path / "m.pt")])
    assert code == 4
    one_error_line(err, "out of memory")
    assert list(tmp_path.iterdir()) == []


def test_a_bug_is_reported_as_ours(tmp_path, monkeypatch):
    import normsurgeon.passes.convert as conv

    def bug(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(conv, "resolve", bug)
    code, _, err = cli(["convert", MODEL, "--to", "gn", "-o", str(tmp_path / "m.pt")])
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: internal error: KeyError") and "please report" in lines[0]
    code, _, err = cli(["--debug", "convert", MODEL, "--to", "gn", "-o", str(tmp_path / "m.pt")])
    assert code == 1 and "Traceback" in err and "KeyError: 'oops'" in err  # --debug: the traceback too
    code, _, err = cli(["--debug", "inspect", "nosuchmodule_xyz:build"])
    assert code == 2 and "cannot import 'nosuchmodule_xyz'" in err  # a user error keeps its code
