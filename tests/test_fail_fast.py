"""Mistakes that need no model are reported before torch is even imported: with a ``torch`` that
cannot be imported first on the path, each still gives its one ``error:`` line (exit 2)."""
import pytest

from tests.util import ROOT, assert_one_error_line, run_cli

CASES = [
    (["convert", "torchvision:resnet18", "--to", "gn", "-o", "out.onnx"], "name the output .pt"),
    (["convert", "missing.pt", "--to", "gn", "-o", "x.pt"], "model file not found"),
    (["convert", "torchvision:resnet18", "--to", "gn", "-o", "existing.pt"], "--force"),
    (["convert", "torchvision:resnet18", "--to", "nosuch", "-o", "x.pt"], "unknown recipe"),
    (["convert", "torchvision:resnet18", "--to", "gn", "--input-shape", "a,b", "-o", "x.pt"], "--input-shape"),
    (["fold", "torchvision:resnet18", "-o", "existing.pt"], "--force"),
    (["fold", "missing.safetensors", "-o", "x.pt"], "model file not found"),
    (["equalize", "torchvision:resnet18", "--c", "nan", "-o", "x.pt"], "--c"),
    (["export", "torchvision:resnet18", "-o", "x.pt"], "export writes ONNX"),
    (["export", "torchvision:resnet18", "-o", "x.onnx", "--exporter", "bogus"], "exporter"),
    (["recalibrate", "torchvision:resnet18", "--data", "missing.npz", "-o", "x.pt"], "not found"),
    (["recalibrate", "torchvision:resnet18", "--data", "digits", "-o", "existing.pt"], "--force"),
    (["evaluate", "torchvision:resnet18", "--data", "missing.npz"], "not found"),
    (["inspect", "missing.pt"], "model file not found"),
    (["inspect", "torchvision:resnet18", "--to", "nosuch"], "unknown recipe"),
    (["bench", "missing.onnx"], "not found"),
    (["diagnose", "torchvision:resnet18", "--data", "digits", "--plot", "out.jpg"], "*.png"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    fake = work / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch must not be imported for this')\n")
    (work / "existing.pt").write_text("keep")
    return work


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(CASES)])
def test_error_comes_before_torch(work, argv, needle):
    proc = run_cli(*argv, cwd=work, env={"PYTHONPATH": f"{work / 'fake'}:{ROOT}"})
    assert_one_error_line(proc, needle)
    assert sorted(p.name for p in work.iterdir()) == ["existing.pt", "fake"]
    assert (work / "existing.pt").read_text() == "keep"
