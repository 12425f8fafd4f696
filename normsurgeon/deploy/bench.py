"""``bench``: latency and throughput of a model on ONNX Runtime, with a PyTorch eager row beside it.

Method: one session per (model, provider, batch size), IO binding with inputs and
outputs bound once (on the GPU: device buffers, so host<->device copies stay out of the timings),
warm-up runs, then timed runs reported as p50/p90/p99 and throughput = batch / p50. ``compare``
models are timed interleaved with the main one in the same process (A, B, A, B, ...), so load on a
shared machine hits both alike; ratios are B / A of the medians.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from normsurgeon.errors import DataError, ModelSpecError, NormSurgeonError, first_line
from normsurgeon.report import Reported
from normsurgeon.threads import check as threads_check
from normsurgeon.threads import torch_threads


@dataclass
class BenchRow:
    model: str
    backend: str  # ort-cpu | ort-cuda | ort-tensorrt | torch-cpu | torch-cuda
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # samples / s at p50
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchReport(Reported):
    provider: str
    provider_note: str
    precision: str
    input_shape: list[int]
    rows: list[BenchRow] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Target:
    label: str
    onnx_path: str
    torch_model: Any  # nn.Module or None (an .onnx MODEL has no PyTorch twin)
    static_batch: int | None


def bench(
    model,
    *,
    provider: str = "auto",
    batch_sizes: tuple[int, ...] | list[int] = (1, 8, 32),
    fp16: bool = False,
    compare=None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    warmup: int = 10,
    runs: int = 50,
    min_seconds: float = 0.0,
    torch_eager: bool = True,
    threads: int | None = None,
    labels: tuple[str, str] = ("model", "compare"),
    progress: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Benchmark ``model`` (an nn.Module, exported on the fly after fold, or a path to an .onnx file)
    and optionally ``compare`` (same kinds) on ONNX Runtime and PyTorch eager.

    ``runs`` timed runs per row (at least ``min_seconds`` of them), after ``warmup`` untimed ones.
    ``threads``: intra-op threads for ORT and torch (default: each library's own default).
    All targets get one input shape: ``input_shape``, else a fixed shape from an .onnx file, else the
    module's own; an .onnx file that cannot take it is an error. A given .onnx file runs as it is, so
    ``fp16`` (export in fp16) is refused for an fp32 file.
    ``progress(done, total)`` is called after each export and each timed batch size (for a bar).
    """
    from normsurgeon.deploy import ort

    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ModelSpecError("batch sizes must be positive integers, e.g. 1,8,32")
    check_settings(runs=runs, warmup=warmup, threads=threads, min_seconds=min_seconds)
    choice = ort.choose(provider)
    models = [model] if compare is None else [model, compare]
    files = [_read_onnx(m) if _is_onnx(m) else None for m in models]
    for m, f in zip(models, files):
        if f is None and not hasattr(m, "forward"):
            raise ModelSpecError(f"cannot benchmark {type(m).__name__}: pass an nn.Module or an .onnx path")
    shape, note = _common_shape(input_shape, models, files, labels)
    rep = BenchReport(provider=choice.name, provider_note=choice.note, precision=_precision(fp16, files, labels),
                      input_shape=shape, notes=[note] if note else [])
    with torch_threads(threads):  # the caller's process keeps its own setting afterwards
        return _run(rep, models, files, labels, batch_sizes, shape, choice, compare, runs, warmup, threads,
                    torch_eager, fp16, min_seconds, progress or (lambda done, total: None))


def _run(rep, models, files, labels, batch_sizes, shape, choice, compare, runs, warmup, threads, torch_eager,
         fp16, min_seconds, progress):
    import torch

    from normsurgeon.deploy import ort

    if compare is not None:
        rep.notes.append("sessions timed in turn run with intra-op spinning off (fair interleaving)")
    steps = sum(f is None for f in files) + len(batch_sizes)
    done = 0
    with tempfile.TemporaryDirectory(prefix="ns-bench-") as work:
        targets = []
        for m, f, label, name in zip(models, files, labels, ("model", "compare")):
            if f is not None:
                targets.append(_Target(label, str(m), None, f.dims[0] if f.dims else None))
            else:  # the user's text is only a label: the export goes to a fixed name inside ``work``
                targets.append(_export(m, label, os.path.join(work, f"{name}.onnx"), fp16, rep))
                done += 1
                progress(done, steps)
        for b in batch_sizes:
            done += 1
            usable = [t for t in targets if t.static_batch in (None, b)]
            for t in targets:
                if t not in usable:
                    rep.notes.append(f"{t.label}: the .onnx file has a fixed batch {t.static_batch}; batch {b} skipped")
            if not usable:
                continue
            x = np.random.default_rng(0).standard_normal((b, *shape[1:])).astype(np.float32)
            sessions = [_user_file_call(t, f"ONNX Runtime cannot load {t.label}; check that the file is a complete "
                                        "model this ONNX Runtime supports", ort.session, t.onnx_path, choice,
                                        threads=threads, spinning=len(usable) == 1) for t in usable]
            runners = [_user_file_call(t, f"ONNX Runtime cannot run {t.label} on a {_fmt(x.shape)} input; check "
                                       "--input-shape and --batch-size against the file", _ort_runner, s, x, choice)
                       for t, s in zip(usable, sessions)]
            times = _interleaved(runners, warmup, runs, min_seconds)
            for t, ts in zip(usable, times):
                rep.rows.append(_row(t.label, f"ort-{choice.name}", b, ts))
            del sessions, runners  # idle ORT threads must not compete with the torch rows
            if torch_eager:
                eager = [t for t in usable if t.torch_model is not None]
                dev = "cuda" if choice.device == "cuda" and torch.cuda.is_available() else "cpu"
                runners = [_torch_runner(t.torch_model, x, dev, fp16) for t in eager]
                times = _interleaved(runners, max(2, warmup // 2), runs, min_seconds)
                for t, ts in zip(eager, times):
                    rep.rows.append(_row(t.label, f"torch-{dev}", b, ts))
            progress(done, steps)
    rep.ratios = _ratios(rep.rows, labels)
    rep.environment = _environment(choice, threads)
    return rep


def time_onnx(paths: dict[str, str], x: np.ndarray, *, provider: str = "cpu", warmup: int = 10, runs: int = 50,
              threads: int | None = None, block: int = 1) -> dict[str, BenchRow]:
    """Time several .onnx files on the same input, in turn (for benchmark scripts).

    ``block=1``: strictly interleaved run by run, intra-op spinning off. ``block=k>1``: blocks of k runs
    per model in rotation, spinning on (ORT's default, what a deployed session gets); the first run of
    each block is dropped (it pays for the other session's threads going idle)."""
    from normsurgeon.deploy import ort

    choice = ort.choose(provider)
    spin = block > 1 or len(paths) == 1
    sessions = {k: ort.session(p, choice, threads=threads, spinning=spin) for k, p in paths.items()}
    runners = [_ort_runner(s, x, choice) for s in sessions.values()]
    if block <= 1:
        times = _interleaved(runners, warmup, runs, 0.0)
    else:
        times = [[] for _ in runners]
        for r in runners:
            for _ in range(warmup):
                r()
        while len(times[0]) < runs:
            for k, r in enumerate(runners):
                for i in range(block + 1):
                    t0 = time.perf_counter()
                    r()
                    if i:
                        times[k].append(time.perf_counter() - t0)
    return {k: _row(k, f"ort-{choice.name}", x.shape[0], ts) for k, ts in zip(sessions, times)}


def check_settings(*, runs: int = 50, warmup: int = 10, threads: int | None = None,
                   min_seconds: float = 0.0) -> None:
    """Raise one ModelSpecError for a timing setting that makes no sense (before any model is loaded)."""
    if int(runs) < 1:
        raise ModelSpecError(f"--runs {runs}: need at least 1 timed run")
    if int(warmup) < 0:
        raise ModelSpecError(f"--warmup {warmup}: the number of warm-up runs must be 0 or more")
    threads_check(threads)
    if min_seconds < 0:
        raise ModelSpecError(f"min_seconds {min_seconds}: must be 0 or more")


@dataclass
class _OnnxFile:
    dims: list[int | None]  # the first input's dims, None where dynamic; [] when the file gives no shape
    fp16: bool


def _is_onnx(model) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).endswith(".onnx")


def _read_onnx(path) -> _OnnxFile:
    """Input dims and precision of a given .onnx file; a missing or unreadable file is the user's error."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelSpecError(f"ONNX file not found: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: the bytes are not a ModelProto
        raise ModelSpecError(f"{p} is not a valid ONNX model; pass an .onnx file written by an ONNX exporter") from None
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights and i.type.HasField("tensor_type")]
    if not inputs:
        raise ModelSpecError(f"{p} is not a valid ONNX model (its graph has no tensor input)")
    tt = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    half = onnx.TensorProto.FLOAT16
    return _OnnxFile(dims, tt.elem_type == half or any(t.data_type == half for t in proto.graph.initializer))


def _fmt(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def _common_shape(input_shape, models, files, labels) -> tuple[list[int], str | None]:
    """The one input shape every target is fed, and a note on where it came from: --input-shape, else the
    first .onnx file's fixed shape, else the first nn.Module's own. Every .onnx file must accept it (its
    batch dim aside: batch sizes a file cannot take are skipped with a note)."""
    from normsurgeon.graph.probe import default_input_shape

    shape, src, note = (list(input_shape) if input_shape else None), None, None  # src: index of the source
    for i, f in enumerate(files):
        if shape is None and f is not None and f.dims and None not in f.dims[1:]:
            shape, src = [f.dims[0] or 1, *f.dims[1:]], i
            if None in files:
                note = f"input shape {_fmt(shape)} taken from {labels[i]}, whose input is fixed"
    for i, (m, f) in enumerate(zip(models, files)):
        if shape is None and f is None:
            shape, src = list(default_input_shape(m, batch=1)), i
    if shape is None:
        raise ModelSpecError(f"{labels[0]} does not fix its input shape ({_fmt(files[0].dims) or 'unknown'}): "
                             "pass --input-shape N,C,H,W")
    for i, f in enumerate(files):
        if f is None or not f.dims or i == src:
            continue
        if len(f.dims) != len(shape) or any(d not in (None, w) for d, w in zip(f.dims[1:], shape[1:])):
            if src is None:
                raise DataError(f"--input-shape {_fmt(shape)} does not fit {labels[i]}, whose input is "
                                f"{_fmt(f.dims)}; drop --input-shape or give one that fits the file")
            theirs = files[src].dims if files[src] else shape
            raise DataError(f"{labels[src]} and {labels[i]} take different input shapes ({_fmt(theirs)} vs "
                            f"{_fmt(f.dims)}); pass an --input-shape both accept, or re-export one of them "
                            "(dynamic batch, same H,W)")
    return shape, note


def _precision(fp16: bool, files, labels) -> str:
    """What is timed: an nn.Module is exported in fp32 or fp16 (``fp16``); an .onnx file runs as it is."""
    for f, label in zip(files, labels):
        if fp16 and f is not None and not f.fp16:
            raise ModelSpecError(f"--fp16: {label} is an fp32 .onnx file and bench runs a given .onnx as it is; "
                                 "drop --fp16 or pass a file exported with --fp16")
    each = ["fp16" if (fp16 if f is None else f.fp16) else "fp32" for f in files]
    if len(set(each)) == 1:
        return each[0]
    return ", ".join(f"{label} {p}" for label, p in zip(labels, each))


def _export(model, label: str, path: str, fp16: bool, rep: BenchReport) -> _Target:
    """Fold and export ``model`` (dynamic batch) to ``path``, a file inside bench's temporary folder."""
    from normsurgeon.deploy.export import export_onnx

    exp = export_onnx(model, path, input_shape=tuple(rep.input_shape), dynamic_batch=True, fp16=fp16, fold=True)
    rep.notes.append(f"{label}: exported on the fly ({exp.exporter}, folded, {exp.seconds.get('total', 0):.1f} s)")
    model.eval()
    return _Target(label, path, model, None)


def _user_file_call(t: _Target, message: str, fn, *args, **kwargs):
    """Call ``fn``; for a user's .onnx file an ONNX Runtime failure becomes one DataError line (for a model
    exported here it would be a normsurgeon bug, so it propagates as is)."""
    if t.torch_model is not None:
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except NormSurgeonError:
        raise
    except Exception as e:  # ORT's exception types (Fail, InvalidArgument, ...) share no base but Exception
        raise DataError(f"{message} ({first_line(e, 600)})") from None


def _ort_runner(sess, x: np.ndarray, choice):
    """A zero-argument callable running one inference with inputs/outputs bound once."""
    inp = sess.get_inputs()[0]
    arr = x.astype(np.float16) if "float16" in inp.type else x
    dev = "cuda" if choice.device == "cuda" else "cpu"
    import onnxruntime

    binding = sess.io_binding()
    value = onnxruntime.OrtValue.ortvalue_from_numpy(arr, dev, 0)
    binding.bind_ortvalue_input(inp.name, value)
    for o in sess.get_outputs():
        binding.bind_output(o.name, dev)
    sess.run_with_iobinding(binding)  # allocates the outputs once; later runs reuse them

    def run():
        sess.run_with_iobinding(binding)
        if dev == "cuda":
            binding.synchronize_outputs()

    run._keep = (binding, value)  # type: ignore[attr-defined]
    return run


def _torch_runner(model, x: np.ndarray, dev: str, fp16: bool):
    import torch

    m = model.to(dev).eval()
    t = torch.from_numpy(x).to(dev)
    if fp16 and dev == "cuda":
        m, t = m.half(), t.half()

    def run():
        with torch.inference_mode():
            m(t)
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


def _interleaved(runners, warmup: int, runs: int, min_seconds: float) -> list[list[float]]:
    for _ in range(max(0, warmup)):
        for r in runners:
            r()
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    i = 0
    while i < max(1, runs) or time.perf_counter() - start < min_seconds:
        for k, r in enumerate(runners):
            t0 = time.perf_counter()
            r()
            times[k].append(time.perf_counter() - t0)
        i += 1
    return times


def _row(label: str, backend: str, batch: int, ts: list[float]) -> BenchRow:
    ms = np.asarray(ts) * 1e3
    p50 = float(np.percentile(ms, 50))
    return BenchRow(model=label, backend=backend, batch=batch, p50_ms=round(p50, 4),
                    p90_ms=round(float(np.percentile(ms, 90)), 4), p99_ms=round(float(np.percentile(ms, 99)), 4),
                    mean_ms=round(float(ms.mean()), 4), min_ms=round(float(ms.min()), 4),
                    throughput=round(batch / (p50 / 1e3), 2), runs=len(ts))


def _ratios(rows: list[BenchRow], labels) -> list[dict[str, Any]]:
    out = []
    base = {(r.backend, r.batch): r for r in rows if r.model == labels[0]}
    for r in rows:
        if r.model != labels[1] or (r.backend, r.batch) not in base:
            continue
        a = base[(r.backend, r.batch)]
        out.append({"backend": r.backend, "batch": r.batch, "p50_ratio": round(r.p50_ms / a.p50_ms, 4),
                    "min_ratio": round(r.min_ms / a.min_ms, 4)})
    return out


def _environment(choice, threads) -> dict[str, Any]:
    import platform

    import onnxruntime
    import torch

    env = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": threads or "default", "ort_providers": [p if isinstance(p, str) else p[0]
                                                              for p in choice.ort_providers]}
    if choice.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env
