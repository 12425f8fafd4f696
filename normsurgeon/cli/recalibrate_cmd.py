"""``normsurgeon recalibrate`` (data-parallel under ``torchrun --nproc-per-node N -m normsurgeon``)."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common

DATA_HELP = ("A .npz/.pt file with x (N, ...: any per-sample shape the model takes) and optional y (N,), an "
             "ImageFolder directory, or "
             "digits / digits:train / digits:test (scikit-learn's bundled digits, 16x16).")


def floats(text: Optional[str], flag: str):
    if text is None:
        return None
    from normsurgeon.errors import DataError

    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise DataError(f"bad {flag} {text!r}: write comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def progress_bar(total: int, label: str):
    """A rich progress bar on stderr showing samples/s; returns (context, callback). When stderr is
    not a terminal (logs, CI, pipes) there is no bar and nothing is printed."""
    if not common.err_console().is_terminal:
        return _null(), lambda n: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} samples/s" if task.speed else "- samples/s")

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                   console=common.err_console(), transient=True)
    task = bar.add_task(label, total=total)
    return bar, lambda n: bar.advance(task, n)


def register(app: typer.Typer) -> None:
    @app.command("recalibrate")
    @common.handle_errors
    def recalibrate_cmd(
        model: str = common.model_arg(),
        data: str = typer.Option(..., "--data", help=DATA_HELP, show_default=False),
        output: str = common.output_opt(),
        batches: Optional[int] = typer.Option(None, "--batches", help="Use at most this many batches."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Use at most this many samples (default: all)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Samples per batch (per forward pass)."),
        noise: Optional[str] = typer.Option(None, "--noise", help="Simulated analog noise: weight:ETA = Gaussian "
                                            "noise with std ETA*max|W| per conv/linear layer."),
        noise_mode: str = typer.Option("fixed", "--noise-mode", help="fixed: one noise instance (a given chip); "
                                       "resample: fresh noise per batch, statistics for any chip."),
        noise_seed: Optional[int] = typer.Option(None, "--noise-seed", help="Noise instance (fixed) or stream (resample)."),
        noise_samples: int = typer.Option(1, "--noise-samples", help="resample: noise draws per batch (K)."),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="Image folders: resize and crop to this (default 224)."),
        mean: Optional[str] = typer.Option(None, "--mean", help="Image folders: per-channel mean (default ImageNet's)."),
        std: Optional[str] = typer.Option(None, "--std", help="Image folders: per-channel std (default ImageNet's)."),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        verify: bool = typer.Option(False, "--verify", help="Fail if anything but running statistics changed."),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
    ) -> None:
        """Re-estimate BatchNorm (and recipe-layer) running statistics on data, exactly pooled."""
        from normsurgeon.calibrate import distributed
        from normsurgeon.calibrate.data import load_data
        from normsurgeon.calibrate.noise import parse_noise
        from normsurgeon.calibrate.recalibrate import recalibrate
        from normsurgeon.model_io import check_output, save_model

        parse_noise(noise)
        mean_t, std_t = floats(mean, "--mean"), floats(std, "--std")
        check_output(output, force)
        with distributed.process_group() as (rank, world):
            m = common.load(model, weights, trust_pickle)
            dataset = load_data(data, image_size=image_size, mean=mean_t, std=std_t)
            total = len(dataset) if samples is None else min(samples, len(dataset))
            if batches is not None:
                total = min(total, batches * batch_size)
            total = total * (noise_samples if noise_mode == "resample" else 1)
            bar, advance = progress_bar(-(-total // world), "recalibrating")
            draws = noise_samples if noise_mode == "resample" else 1
            with bar if rank == 0 else _null():
                result = recalibrate(m, dataset, batches=batches, samples=samples, batch_size=batch_size,
                                     noise=noise, noise_mode=noise_mode, noise_seed=noise_seed,
                                     noise_samples=noise_samples, verify=verify,
                                     progress=(lambda n: advance(n * draws)) if rank == 0 else None)
            if rank != 0:
                return
            path = save_model(result.model, output, force=force)
        info = result.info
        extra = {"output": str(path), "samples": info["samples"], "samples_per_s": info["samples_per_s"],
                 "world_size": info["world_size"], "statistics_kernel": info["statistics_kernel"],
                 "in_place": info["in_place"]}
        if info.get("noise"):
            extra["noise"] = f"{info['noise']} ({info['noise_mode']}, seed {info['noise_seed']})"
        common.render_result(result, "recalibrate", as_json, extra)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
