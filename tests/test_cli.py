"""The real command line (subprocess): every user error is one ``error:`` line, a non-zero exit, no
traceback and no file written; --help is torch-free; --json prints one object."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from tests.util import ROOT, assert_one_error_line, run_cli

SHAPE = ["--input-shape", "2,3,32,32"]


def assert_clean_error(proc, *needles, exit_code=2):
    assert proc.returncode == exit_code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "internal error" not in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path):
    """A folder with a full pickle, a corrupt file and a user factory module."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    torch.save(model, tmp_path / "full.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "clinets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Branchy(nn.Module):
            # data-dependent control flow: torch.fx cannot trace it
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            def forward(self, x):
                y = self.bn(self.conv(x))
                return y.relu() if y.sum() > 0 else y

        def branchy():
            return Branchy()

        def small():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    """))
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    return tmp_path


def listing(path):
    return sorted(p.name for p in path.iterdir() if p.name != "__pycache__")


ERRORS = [
    ("missing file", ["convert", "nope.pt", "--to", "gn"], ["not found", "nope.pt"]),
    ("corrupt file", ["convert", "corrupt.pt", "--to", "gn"], ["corrupt"]),
    ("unknown recipe", ["convert", "torchvision:resnet18", "--to", "bogus"], ["unknown recipe", "gn+ws", "frozen", "ln"]),
    ("bad recipe arg", ["convert", "torchvision:resnet18", "--to", "gn:abc"], ["bad argument"]),
    ("unknown torchvision", ["convert", "torchvision:resnet9000", "--to", "gn"], ["unknown torchvision model"]),
    ("unknown timm", ["convert", "timm:resnet9000", "--to", "gn"], ["unknown timm model"]),
    ("refused pickle", ["convert", "full.pt", "--to", "gn"], ["--trust-pickle", "runs code"]),
    ("bad factory", ["convert", "nomod_zz:make", "--to", "gn"], ["cannot import"]),
    ("untraceable, probe fails", ["convert", "clinets:branchy", "--to", "gn", "--input-shape", "2,5,8,8"],
     ["probe input", "--input-shape"]),
    ("bad input shape", ["convert", "torchvision:resnet18", "--to", "gn", "--input-shape", "2,three"], ["--input-shape"]),
    ("bad --layer", ["convert", "torchvision:resnet18", "--to", "gn", "--layer", "layer4"], ["PATTERN=RECIPE"]),
    ("bad --layer recipe", ["convert", "torchvision:resnet18", "--to", "gn", "--layer", "layer4.*=nope"],
     ["unknown recipe"]),
]


@pytest.mark.parametrize("what,args,needles", ERRORS, ids=[e[0] for e in ERRORS])
def test_cli_errors_are_one_line_and_write_nothing(work, what, args, needles):
    before = listing(work)
    proc = run_cli(*args, "-o", "out.pt", cwd=work)
    assert_clean_error(proc, *needles)
    assert listing(work) == before  # no output, no temp file


def test_existing_output_needs_force(work):
    proc = run_cli("convert", "clinets:small", "--to", "frozen", "-o", "exists.pt", *SHAPE, cwd=work)
    assert_clean_error(proc, "exists", "--force")
    assert (work / "exists.pt").read_bytes() == b"keep me"
    proc = run_cli("convert", "clinets:small", "--to", "frozen", "-o", "exists.pt", "--force", *SHAPE, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert (work / "exists.pt").read_bytes() != b"keep me"


def test_convert_json_factory_and_untraceable_fallback(work):
    """The untraceable factory model converts through module-swap and the JSON report says so; the
    written manifest loads back (no --trust-pickle) and convert -> convert chains on the CLI."""
    proc = run_cli("convert", "clinets:branchy", "--to", "frozen", "-o", "b.pt", "--json", "--input-shape",
                   "2,3,8,8", "--verify", cwd=work, real=True)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["verb"] == "convert" and d["path"] == "module-swap"
    assert d["changes"][0]["action"] == "fallback" and "cannot trace" in d["changes"][0]["detail"]
    assert d["verification"]["ok"] and d["verification"]["max_rel_error"] <= 1e-5
    assert d["output"].endswith("b.pt")
    proc = run_cli("convert", "b.pt", "--to", "gn+ws", "-o", "c.safetensors", "--json", "--input-shape", "2,3,8,8",
                   "--trust-code", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"] == {"fallback": 1}  # nothing left to convert: all frozen
    sys.path.insert(0, str(work))
    try:
        import normsurgeon

        import os
        cwd = os.getcwd()
        os.chdir(work)
        try:
            m = normsurgeon.load_model("c.safetensors", trust_code=True)
        finally:
            os.chdir(cwd)
        assert type(m.bn).__name__ == "FrozenBatchNorm"
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("clinets", None)


def test_convert_table_pickle_opt_in_keep_and_layer(work):
    proc = run_cli("convert", "full.pt", "--trust-pickle", "--to", "gn+ws", "-o", "p.pt", "--input-shape",
                   "2,3,8,8", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "1 standardized, 1 replaced (fx)" in proc.stdout and "normsurgeon distill p.pt" in proc.stdout
    proc = run_cli("convert", "torchvision:resnet18", "--to", "gn+ws", "-o", "r.pt", "--keep", "layer4.1.*",
                   "--layer", "layer3.*=ln", "--json", *SHAPE, cwd=work)
    assert proc.returncode == 0, proc.stderr
    ch = {c["target"]: c for c in json.loads(proc.stdout)["changes"]}
    assert ch["layer4.1.bn1"]["action"] == "kept" and ch["layer4.1.bn2"]["action"] == "kept"
    assert ch["layer3.0.bn1"]["after"] == "GroupNorm(1, 256)"
    assert ch["layer2.0.bn1"]["after"] == "GroupNorm(32, 128)"


def test_inspect_json_is_one_object(work):
    proc = run_cli("inspect", "torchvision:resnet18", "--json", *SHAPE, cwd=work, real=True)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["traceable"] is True and d["path"] == "fx" and d["input_shape"] == [2, 3, 32, 32]
    layers = {l["name"]: l for l in d["layers"]}
    assert len(layers) == 20 and d["counts"] == {"BatchNorm2d": 20}
    bn1 = layers["bn1"]
    assert bn1["producer"] == "conv1" and bn1["consumers"] == ["relu"] and bn1["channels"] == 64
    assert bn1["convert"].startswith("replaced -> GroupNorm")
    proc = run_cli("inspect", "clinets:branchy", "--json", "--input-shape", "2,3,8,8", cwd=work)
    d = json.loads(proc.stdout)
    assert d["traceable"] is False and d["path"] == "module-swap" and "TraceError" in d["trace_error"]
    assert d["layers"][0]["producer"] == "conv"
    assert listing(work) == sorted(["clinets.py", "corrupt.pt", "exists.pt", "full.pt"])


def test_inspect_table_and_errors(work):
    proc = run_cli("inspect", "clinets:branchy", "--input-shape", "2,3,8,8", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "not traceable" in proc.stdout and "module-swap" in proc.stdout and "bn" in proc.stdout
    assert_clean_error(run_cli("inspect", "full.pt", cwd=work), "--trust-pickle")
    assert_clean_error(run_cli("inspect", "torchvision:resnet18", "--to", "nope", cwd=work), "unknown recipe")


HELP_PROBE = """
import sys
sys.argv = ["normsurgeon"] + sys.argv[1:]
from normsurgeon.cli.app import app
try:
    app()
except SystemExit:
    pass
heavy = [m for m in ("torch", "torchvision", "timm", "onnx", "onnxruntime") if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["inspect", "--help"]])
def test_help_does_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY:\n" in proc.stdout or proc.stdout.rstrip().endswith("HEAVY:")
    if args[0] == "convert":
        for name in ("gn+ws", "frozen", "ln", "in"):
            assert name in proc.stdout
    if args == ["--help"]:
        assert "convert" in proc.stdout and "inspect" in proc.stdout


def test_module_entry_point_and_version():
    proc = run_cli("--version", real=True)
    assert proc.returncode == 0 and proc.stdout.startswith("normsurgeon ")


@pytest.mark.parametrize("args", [
    ("equalize", "--bogus"),                                     # unknown option
    ("convert",),                                                # missing argument
    ("nosuchverb",),                                             # unknown command
    ("equalize", "normsurgeon:digits_cnn", "--iters", "abc", "-o", "x.pt"),  # bad type
], ids=["unknown-option", "missing-argument", "unknown-command", "bad-type"])
def test_usage_mistakes_are_one_error_line(tmp_path, args):
    r = run_cli(*args, cwd=tmp_path)
    assert_one_error_line(r, "--help")
    assert "╭" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bare_command_prints_help_and_succeeds():
    r = run_cli()
    assert r.returncode == 0 and "Usage" in r.stdout and "convert" in r.stdout


@pytest.mark.parametrize("args", [
    ("convert", "torchvision:resnet18", "--to", "gn", "--keep", "layer9.*"),
    ("convert", "torchvision:resnet18", "--to", "gn", "--layer", "layr1.*=frozen"),
    ("fold", "torchvision:resnet18", "--keep", "nope*"),
], ids=["convert-keep", "convert-layer", "fold-keep"])
def test_layer_pattern_matching_nothing_is_an_error(tmp_path, args):
    out = tmp_path / "m.pt"
    r = run_cli(*args, "--input-shape", "1,3,32,32", "-o", str(out))
    assert_one_error_line(r, "matches no layer")
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["convert", "torchvision:resnet18", "--to", "gnws", "-o", "x.pt"], "did you mean gn+ws"),
    (["inspect", "torchvision:resnet19"], "did you mean resnet18"),
    (["inspect", "normsurgeon.calibrate.digits_cnn:digit_cnn"], "did you mean digits_cnn"),
])
def test_did_you_mean(tmp_path, argv, needle):
    from tests.security.files import cli, one_error_line

    code, _, err = cli(argv, cwd=tmp_path)
    assert code == 2
    one_error_line(err, needle)


@pytest.mark.parametrize("argv", [
    ["convert", "normsurgeon:digits_cnn", "--to", "gn", "--input-shape", "2,1,16,16"],
    ["fold", "normsurgeon:digits_cnn", "--input-shape", "2,1,16,16"],
    ["equalize", "normsurgeon:digits_cnn", "--input-shape", "2,1,16,16"],
    ["recalibrate", "normsurgeon:digits_cnn", "--data", "digits:train", "--samples", "128"],
])
def test_verbose_lists_what_the_summary_counts(tmp_path, argv):
    """The summary's "(--verbose lists them)" is a promise: with --verbose every changed layer is a row."""
    plain = run_cli(*argv, "-o", str(tmp_path / "a.pt"))
    assert plain.returncode == 0, plain.stderr
    assert "(--verbose lists them)" in plain.stdout
    full = run_cli(*argv, "-o", str(tmp_path / "b.pt"), "--verbose", env={"COLUMNS": "160"})
    assert full.returncode == 0, full.stderr
    assert "--verbose" not in full.stdout and "action" in full.stdout
    layers = {"1", "5", "9"} if argv[0] != "equalize" else {"0", "4", "8"}
    rows = [ln for ln in full.stdout.splitlines() if ln.startswith("│")]
    assert layers <= {ln.split("│")[1].strip() for ln in rows}, full.stdout
