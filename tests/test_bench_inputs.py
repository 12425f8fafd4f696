"""bench with user paths and bad inputs: exports stay inside bench's temporary folder, and every user
mistake (bad file, bad count, shapes or precision that do not fit) is one ``error:`` line, exit 2."""
from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

import normsurgeon
from normsurgeon.deploy import ort
from normsurgeon.errors import DataError, ModelSpecError
from tests.util import assert_one_error_line, run_cli

DIGITS = "normsurgeon:digits_cnn"  # 1 channel in, adaptive pool: any H,W
FAST = ["--provider", "cpu", "--batch-size", "1", "--runs", "2", "--warmup", "0"]


def _export(path, shape, fp16=False, dynamic_batch=False):
    normsurgeon.export_onnx(normsurgeon.load_model(DIGITS), path, input_shape=shape, fp16=fp16,
                            dynamic_batch=dynamic_batch, exporter="torchscript")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Fixed-shape fp32 and fp16 files, one with dynamic H,W, non-ONNX bytes, files ORT cannot load or run."""
    d = tmp_path_factory.mktemp("bench-files")
    _export(d / "d28.onnx", (1, 1, 28, 28))
    _export(d / "d64.onnx", (1, 1, 64, 64))
    _export(d / "h28.onnx", (1, 1, 28, 28), fp16=True)
    _export(d / "dyn.onnx", (1, 1, 28, 28), dynamic_batch=True)
    proto = onnx.load(str(d / "dyn.onnx"))
    for i, name in ((2, "H"), (3, "W")):
        dim = proto.graph.input[0].type.tensor_type.shape.dim[i]
        dim.ClearField("dim_value")
        dim.dim_param = name
    del proto.graph.value_info[:]
    onnx.save(proto, str(d / "hw.onnx"))
    proto = onnx.load(str(d / "d28.onnx"))  # batch 1 is baked into its Reshape: batch 2 fails in ORT
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "N"
    del proto.graph.value_info[:]
    onnx.save(proto, str(d / "nb.onnx"))
    (d / "garbage.onnx").write_bytes(bytes(range(256)) * 4)
    (d / "empty.onnx").write_bytes(b"")
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 4])
    ints = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "ints", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(ints, str(d / "ints.onnx"))  # bench feeds float noise: ORT cannot run it
    bad = helper.make_model(helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad", [x], [y]),
                            opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(bad, str(d / "badop.onnx"))  # ORT cannot load it
    return d


def _listing(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))



def test_cli_bench_relative_model_paths_with_a_folder(tmp_path):
    """``bench out/a.pt --compare out/b.pt``: labels stay the user's text, exports go to the temp folder."""
    (tmp_path / "out").mkdir()
    for name in ("a.pt", "b.pt"):
        normsurgeon.save_model(normsurgeon.load_model(DIGITS), tmp_path / "out" / name)
    before = _listing(tmp_path)
    proc = run_cli("bench", "out/a.pt", "--compare", "out/b.pt", "--input-shape", "1,1,28,28", "--no-torch",
                   "--json", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert [r["model"] for r in d["rows"]] == ["out/a.pt", "out/b.pt"]
    assert d["input_shape"] == [1, 1, 28, 28] and len(d["ratios"]) == 1
    assert _listing(tmp_path) == before


def test_cli_bench_absolute_path_writes_nothing_and_reruns(tmp_path):
    """Nothing next to the input (no stray a.pt.onnx), the temp folder is removed, a rerun works."""
    (tmp_path / "out").mkdir()
    model = tmp_path / "out" / "a.pt"
    normsurgeon.save_model(normsurgeon.load_model(DIGITS), model)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    before = _listing(tmp_path / "out")
    for _ in range(2):
        proc = run_cli("bench", str(model), "--input-shape", "1,1,28,28", "--no-torch", *FAST, cwd=tmp_path,
                       env={"TMPDIR": str(tmp)})
        assert proc.returncode == 0, proc.stderr
        assert "exported on the fly" in proc.stdout
    assert _listing(tmp_path / "out") == before
    assert not list(tmp.glob("ns-bench-*"))  # (torch's own caches may stay in TMPDIR)


@pytest.mark.parametrize("args, needles", [
    (["garbage.onnx"], ["garbage.onnx is not a valid ONNX model"]),
    (["empty.onnx"], ["empty.onnx is not a valid ONNX model"]),
    (["d28.onnx", "--threads", "-2"], ["--threads -2", "1 or more"]),
    (["d28.onnx", "--threads", "0"], ["--threads 0", "1 or more"]),
    (["d28.onnx", "--runs", "0"], ["--runs 0", "at least 1"]),
    (["d28.onnx", "--runs", "-5"], ["--runs -5", "at least 1"]),
    (["d28.onnx", "--warmup", "-1"], ["--warmup -1", "0 or more"]),
    (["d28.onnx", "--compare", "d64.onnx"], ["different input shapes", "1x1x28x28", "1x1x64x64"]),
    (["d28.onnx", "--input-shape", "1,1,32,32"], ["--input-shape 1x1x32x32 does not fit d28.onnx", "1x1x28x28"]),
    ([DIGITS, "--compare", "d64.onnx", "--input-shape", "1,1,28,28"], ["does not fit d64.onnx"]),
    (["hw.onnx"], ["hw.onnx does not fix its input shape", "--input-shape"]),
    (["hw.onnx", "--input-shape", "1,3,32,32"], ["does not fit hw.onnx", "?x1x?x?"]),
    (["d28.onnx", "--fp16"], ["--fp16", "d28.onnx is an fp32 .onnx file"]),
    (["h28.onnx", "--fp16", "--compare", "d28.onnx"], ["d28.onnx is an fp32 .onnx file"]),
    (["badop.onnx", "--input-shape", "1,4"], ["ONNX Runtime cannot load badop.onnx"]),
    (["ints.onnx", "--input-shape", "1,4"], ["ONNX Runtime cannot run ints.onnx on a 1x4 input"]),
    (["nb.onnx", "--batch-size", "2"], ["ONNX Runtime cannot run nb.onnx on a 2x1x28x28 input", "--batch-size"]),
])
def test_cli_bench_user_mistakes_are_one_line(files, args, needles):
    before = _listing(files)
    proc = run_cli("bench", *FAST, *args, cwd=files)  # args come last: they override FAST
    assert_one_error_line(proc, *needles)
    assert _listing(files) == before


def test_cli_bench_module_takes_the_fixed_shape_of_the_onnx_it_is_compared_with(files):
    """The module defaults to 224x224; the fixed 64x64 file decides, and a note says so."""
    proc = run_cli("bench", DIGITS, "--compare", "d64.onnx", "--no-torch", "--json", *FAST, cwd=files)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["input_shape"] == [1, 1, 64, 64]
    assert [r["model"] for r in d["rows"]] == [DIGITS, "d64.onnx"]
    assert any("taken from d64.onnx" in n for n in d["notes"])


def test_bench_dynamic_onnx_honours_input_shape(files):
    rep = normsurgeon.bench(str(files / "hw.onnx"), provider="cpu", batch_sizes=(1, 2), input_shape=(1, 1, 32, 32),
                            runs=2, warmup=0)
    assert rep.input_shape == [1, 1, 32, 32] and [r.batch for r in rep.rows] == [1, 2]


def test_bench_precision_of_an_onnx_file_is_what_it_holds(files):
    rep = normsurgeon.bench(str(files / "h28.onnx"), provider="cpu", batch_sizes=(1,), runs=2, warmup=0)
    assert rep.precision == "fp16"
    rep = normsurgeon.bench(str(files / "h28.onnx"), compare=str(files / "d28.onnx"), provider="cpu",
                            batch_sizes=(1,), runs=2, warmup=0, labels=("h", "d"))
    assert rep.precision == "h fp16, d fp32"
    rep = normsurgeon.bench(str(files / "d28.onnx"), provider="cpu", batch_sizes=(1,), runs=2, warmup=0)
    assert rep.precision == "fp32"
    with pytest.raises(ModelSpecError, match="fp32 .onnx file"):
        normsurgeon.bench(str(files / "d28.onnx"), fp16=True, provider="cpu", batch_sizes=(1,), runs=2)


def test_library_rejects_bad_counts_and_threads(files):
    path = str(files / "d28.onnx")
    for kwargs in ({"runs": 0}, {"warmup": -1}, {"threads": 0}, {"min_seconds": -1.0}):
        with pytest.raises(ModelSpecError):
            normsurgeon.bench(path, provider="cpu", batch_sizes=(1,), **kwargs)
    with pytest.raises(ModelSpecError, match="threads"):
        ort.session(path, threads=-2)
    with pytest.raises(DataError, match="different input shapes"):
        normsurgeon.bench(path, compare=str(files / "d64.onnx"), provider="cpu", batch_sizes=(1,))
