"""bench on the CPU EP (always available here); CUDA paths skip cleanly or fail with one clear line."""
from __future__ import annotations

import json

import pytest
from torch import nn

import normsurgeon
from normsurgeon.deploy import ort
from normsurgeon.errors import DependencyError
from tests.conftest import cuda_available
from tests.util import randomize_norm_stats, run_cli


def _small(width: int):
    return randomize_norm_stats(nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))).eval()


def test_bench_cpu_rows_percentiles_and_interleaved_compare():
    rep = normsurgeon.bench(_small(8), compare=_small(128), provider="cpu", batch_sizes=(1, 2),
                            input_shape=(1, 3, 32, 32), runs=8, warmup=1, threads=1)
    assert rep.provider == "cpu" and rep.input_shape == [1, 3, 32, 32]
    keys = {(r.model, r.backend, r.batch) for r in rep.rows}
    assert keys == {(m, b, n) for m in ("model", "compare") for b in ("ort-cpu", "torch-cpu") for n in (1, 2)}
    for r in rep.rows:
        assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms and r.runs == 8
        assert r.throughput == pytest.approx(r.batch / (r.p50_ms / 1e3), rel=1e-3)
    assert len(rep.ratios) == 4
    assert {(d["backend"], d["batch"]) for d in rep.ratios} == {(b, n) for b in ("ort-cpu", "torch-cpu") for n in (1, 2)}
    # 128 channels cost ~250x the FLOPs of 8: the fastest runs (robust to load on a shared machine) show it
    fastest = {(r.model, r.batch): r.min_ms for r in rep.rows if r.backend == "ort-cpu"}
    assert fastest[("compare", 2)] > fastest[("model", 2)]
    json.dumps(rep.to_dict())


def test_bench_onnx_file_with_fixed_batch(tmp_path):
    path = tmp_path / "m.onnx"
    normsurgeon.export_onnx(_small(8), path, input_shape=(2, 3, 16, 16), exporter="torchscript",
                           dynamic_batch=False)
    rep = normsurgeon.bench(str(path), provider="cpu", batch_sizes=(1, 2), runs=3, warmup=1)
    assert [(r.backend, r.batch) for r in rep.rows] == [("ort-cpu", 2)]  # no torch twin for an .onnx
    assert any("fixed batch 2" in n for n in rep.notes)


@pytest.mark.skipif(cuda_available() and "CUDAExecutionProvider" in ort.available(), reason="CUDA EP present")
def test_cuda_provider_missing_is_one_clear_error():
    with pytest.raises(DependencyError) as e:
        ort.choose("cuda")
    msg = str(e.value)
    assert "\n" not in msg and "onnxruntime-gpu" in msg
    auto = ort.choose("auto")
    assert auto.name == "cpu" and "auto picked cpu" in auto.note


@pytest.mark.skipif(cuda_available() and "CUDAExecutionProvider" in ort.available(), reason="CUDA EP present")
def test_cli_bench_cuda_without_cuda_exits_with_one_line(tmp_path):
    r = run_cli("bench", "torchvision:resnet18", "--provider", "cuda", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: cuda execution provider unavailable")


@pytest.mark.cuda
@pytest.mark.skipif(not (cuda_available() and "CUDAExecutionProvider" in ort.available()),
                    reason="needs a CUDA GPU and onnxruntime-gpu")
def test_bench_cuda_rows():
    rep = normsurgeon.bench(_small(16), provider="cuda", batch_sizes=(1, 8), input_shape=(1, 3, 32, 32), runs=5)
    assert {r.backend for r in rep.rows} == {"ort-cuda", "torch-cuda"}


def test_cli_bench_json(tmp_path):
    r = run_cli("bench", "torchvision:squeezenet1_1", "--provider", "cpu", "--batch-size", "1",
                "--input-shape", "1,3,32,32", "--runs", "3", "--warmup", "1", "--no-torch", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["provider"] == "cpu" and [row["backend"] for row in d["rows"]] == ["ort-cpu"]


def test_bench_leaves_the_callers_thread_count_alone(tmp_path):
    import torch

    import normsurgeon

    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    m = normsurgeon.load_model("normsurgeon:digits_cnn")
    normsurgeon.bench(m, provider="cpu", batch_sizes=[1], runs=2, warmup=0, threads=want, torch_eager=False,
                      input_shape=(1, 1, 16, 16))
    assert torch.get_num_threads() == before
