"""``normsurgeon bench``."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common


def _batches(text: str) -> list[int]:
    from normsurgeon.errors import ModelSpecError

    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(b < 1 for b in out):
        raise ModelSpecError(f"bad --batch-size {text!r}: write positive integers like 1,8,32")
    return out


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @common.handle_errors
    def bench_cmd(
        model: str = common.model_arg(),
        provider: str = typer.Option("auto", "--provider", help="auto (best available, says which), cuda, cpu or tensorrt."),
        batch_size: str = typer.Option("1,8,32", "--batch-size", help="Comma-separated batch sizes."),
        fp16: bool = typer.Option(False, "--fp16", help="Export MODEL in fp16 (an .onnx file runs as it is: give an fp16 one)."),
        compare: Optional[str] = typer.Option(None, "--compare", help="A second MODEL (or .onnx) timed interleaved with the first; prints ratios."),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        input_shape: Optional[str] = common.input_shape_opt(),
        runs: int = typer.Option(50, "--runs", help="Timed runs per row."),
        warmup: int = typer.Option(10, "--warmup", help="Untimed warm-up runs per row."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads for ORT and torch (default: each library's own)."),
        no_torch: bool = typer.Option(False, "--no-torch", help="Skip the PyTorch eager rows."),
        as_json: bool = common.json_opt(),
    ) -> None:
        """Latency (p50/p90/p99) and throughput on ONNX Runtime, with a PyTorch eager reference row.
        A MODEL that is not an .onnx file is folded and exported on the fly."""
        from normsurgeon import preflight
        from normsurgeon.deploy import ort
        from normsurgeon.deploy.bench import check_settings

        preflight.model_spec(model)
        if compare:
            preflight.model_spec(compare)
        batches = _batches(batch_size)
        check_settings(runs=runs, warmup=warmup, threads=threads)
        ort.choose(provider)  # fail before loading anything when the provider is missing
        shape = preflight.shape(input_shape)  # every check above runs before torch is imported
        from normsurgeon.deploy.bench import bench

        a = model if model.endswith(".onnx") else common.load(model, weights, trust_pickle, trust_code)
        b = None
        if compare:
            b = compare if compare.endswith(".onnx") else common.load(compare, None, trust_pickle, trust_code)
        steps = (not model.endswith(".onnx")) + bool(compare and not compare.endswith(".onnx")) + len(batches)
        bar, advance = common.progress_bar(steps, "benchmarking", unit="steps")
        with bar:
            rep = bench(a, provider=provider, batch_sizes=batches, fp16=fp16, compare=b, input_shape=shape,
                        runs=runs, warmup=warmup, threads=threads, torch_eager=not no_torch,
                        labels=(model, compare or "compare"), progress=lambda done, total: advance(1))
        if as_json:
            common.print_json(rep.to_dict(), "bench")
            return
        _render(rep)


def _render(rep) -> None:
    from rich.table import Table

    out = common.console()
    t = Table(title=f"bench: {rep.provider} ({rep.precision}), input {rep.input_shape}")
    for col in ("model", "backend", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s"):
        t.add_column(col, justify="right" if col not in ("model", "backend") else "left")
    for r in rep.rows:
        t.add_row(r.model, r.backend, str(r.batch), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
                  f"{r.throughput:.1f}")
    out.print(t)
    for r in rep.ratios:
        out.print(f"ratio compare/model, {r['backend']} batch {r['batch']}: p50 {r['p50_ratio']:.3f}x")
    if rep.provider_note:
        out.print(f"provider: {common.escape(rep.provider_note)}")
    for n in rep.notes:
        out.print(f"note: {common.escape(n)}")
