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


progress_bar = common.progress_bar  # shared by the data verbs (evaluate, diagnose, distill)


def register(app: typer.Typer) -> None:
    @app.command("recalibrate")
    @common.handle_errors
    def recalibrate_cmd(
        model: str = common.model_arg(),
        data: str = typer.Option(..., "--data", help=DATA_HELP, show_default=False),
        output: str = common.output_opt(),
        batches: Optional[int] = typer.Option(None, "--batches", help="Use at most this many batches (default: all)."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Use at most this many samples (default: all)."),
        batch_size: int = typer.Option(32, "--batch-size", help="Samples per batch (per forward pass)."),
        threads: Optional[int] = common.threads_opt(),
        noise: Optional[str] = common.noise_opt(),
        noise_mode: str = common.noise_mode_opt(),
        noise_seed: Optional[int] = common.noise_seed_opt(),
        noise_samples: int = common.noise_samples_opt(),
        image_size: Optional[int] = common.image_size_opt(),
        mean: Optional[str] = common.mean_opt(),
        std: Optional[str] = common.std_opt(),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        verify: bool = typer.Option(False, "--verify", help="Fail if anything but running statistics changed."),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """Re-estimate BatchNorm (and recipe-layer) running statistics on data, exactly pooled."""
        from normsurgeon import preflight
        from normsurgeon.threads import torch_threads

        preflight.model_spec(model)
        preflight.data_spec(data)
        preflight.threads(threads)
        preflight.noise(noise)
        mean_t, std_t = floats(mean, "--mean"), floats(std, "--std")
        common.check_output(output, force)  # every check above runs before torch is imported
        from normsurgeon.calibrate import distributed
        from normsurgeon.calibrate.data import load_data
        from normsurgeon.calibrate.recalibrate import recalibrate
        from normsurgeon.model_io import save_model

        with distributed.process_group() as (rank, world), torch_threads(threads):
            m = common.load(model, weights, trust_pickle, trust_code)
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
        extra = {"samples": info["samples"], "samples/s": info["samples_per_s"], "processes": info["world_size"]}
        if info.get("noise"):
            extra["noise"] = f"{info['noise']} ({info['noise_mode']}, seed {info['noise_seed']})"
        common.render_result(result, "recalibrate", as_json, str(path), extra, verbose=verbose)


_null = common.NoProgress
