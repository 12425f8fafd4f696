"""``normsurgeon evaluate``: top-1 accuracy and loss, optionally under simulated weight noise."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common
from normsurgeon.cli.recalibrate_cmd import DATA_HELP, _null, floats, progress_bar


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    @common.handle_errors
    def evaluate_cmd(
        model: str = common.model_arg(),
        data: str = typer.Option(..., "--data", help=DATA_HELP + " Needs labels y.", show_default=False),
        noise: Optional[str] = typer.Option(None, "--noise", help="Simulated analog noise, weight:ETA (as in recalibrate)."),
        noise_seed: Optional[int] = typer.Option(None, "--noise-seed", help="Noise instance; the same seed as recalibrate "
                                       "--noise-mode fixed gives the same instance; default 0."),
        batch_size: int = typer.Option(256, "--batch-size", help="Samples per forward pass."),
        threads: Optional[int] = common.threads_opt(),
        samples: Optional[int] = typer.Option(None, "--samples", help="Use at most this many samples."),
        image_size: Optional[int] = common.image_size_opt(),
        mean: Optional[str] = common.mean_opt(),
        std: Optional[str] = common.std_opt(),
        teacher: Optional[str] = typer.Option(None, "--teacher", help="Also report top-1 agreement with this "
                                              "model and the mean output difference (e.g. after distill)."),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        as_json: bool = common.json_opt(),
    ) -> None:
        """Top-1 accuracy and cross-entropy loss on labelled data."""
        from normsurgeon import preflight
        from normsurgeon.threads import torch_threads

        preflight.model_spec(model)
        if teacher is not None:
            preflight.model_spec(teacher)
        preflight.data_spec(data)
        preflight.threads(threads)
        preflight.noise(noise)
        mean_t, std_t = floats(mean, "--mean"), floats(std, "--std")  # all before torch is imported
        from normsurgeon.calibrate import distributed
        from normsurgeon.calibrate.data import load_data
        from normsurgeon.calibrate.evaluate import evaluate

        with distributed.process_group() as (rank, world), torch_threads(threads):
            m = common.load(model, weights, trust_pickle, trust_code)
            t = common.load(teacher, None, trust_pickle, trust_code) if teacher is not None else None
            dataset = load_data(data, image_size=image_size, mean=mean_t, std=std_t)
            total = len(dataset) if samples is None else min(samples, len(dataset))
            bar, advance = progress_bar(-(-total // world), "evaluating")
            with bar if rank == 0 else _null():
                report = evaluate(m, dataset, noise=noise, noise_seed=noise_seed, batch_size=batch_size,
                                  samples=samples, progress=advance if rank == 0 else None, teacher=t)
            if rank != 0:
                return
        if as_json:
            common.print_json(report, "evaluate")
            return
        from rich.table import Table

        table = Table(title=f"evaluate {model}")
        cols = ["data", "samples", "accuracy", "loss", "noise"] + (["agreement", "output diff"] if t is not None else [])
        for col in cols:
            table.add_column(col)
        noise_text = f"{report['noise']} (seed {report['noise_seed']})" if report["noise"] else "none"
        extra = [f"{report['agreement']:.4f}", f"{report['output_diff']:.4g}"] if t is not None else []
        table.add_row(report["data"], str(report["samples"]), f"{report['accuracy']:.4f}", f"{report['loss']:.4f}",
                      noise_text, *extra)
        common.console().print(table)
