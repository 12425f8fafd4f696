"""``normsurgeon diagnose``: per-norm-layer measures on data, as a table, JSON, PNG and HTML."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common
from normsurgeon.cli.recalibrate_cmd import DATA_HELP, floats, progress_bar


def register(app: typer.Typer) -> None:
    @app.command("diagnose")
    @common.handle_errors
    def diagnose_cmd(
        model: str = common.model_arg(),
        data: str = typer.Option(..., "--data", help=DATA_HELP, show_default=False),
        teacher: Optional[str] = typer.Option(None, "--teacher", help="A MODEL to compare features with, "
                                              "layer by layer (e.g. the model before convert)."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Use the first N samples (default: all)."),
        batch_size: int = typer.Option(64, "--batch-size", help="Samples per forward pass (results do not depend on it)."),
        threads: Optional[int] = common.threads_opt(),
        plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG: one panel per measure against layer depth."),
        html_out: Optional[str] = typer.Option(None, "--html", help="Write one self-contained HTML page (plots, sortable table)."),
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
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
    ) -> None:
        """Show, per norm layer, stale BN statistics, channel collapse, instance variability, dead
        channels and (with --teacher) similarity, with a verdict; see docs/diagnose.md."""
        from normsurgeon import preflight
        from normsurgeon.diagnosis.output import check_report_path, need_matplotlib
        from normsurgeon.threads import torch_threads

        preflight.model_spec(model)
        if teacher is not None:
            preflight.model_spec(teacher)
        preflight.data_spec(data)
        preflight.threads(threads)
        preflight.noise(noise)
        mean_t, std_t = floats(mean, "--mean"), floats(std, "--std")
        png = check_report_path(plot, ".png", "--plot", force) if plot is not None else None
        page = check_report_path(html_out, ".html", "--html", force) if html_out is not None else None
        if plot is not None or html_out is not None:
            need_matplotlib()
        from normsurgeon.calibrate.data import load_data  # the checks above run before torch is imported
        from normsurgeon.calibrate.noise import resolve_noise
        from normsurgeon.diagnosis import diagnose

        resolve_noise(noise, noise_mode, noise_seed, noise_samples)
        m = common.load(model, weights, trust_pickle, trust_code)
        t = common.load(teacher, None, trust_pickle, trust_code) if teacher is not None else None
        dataset = load_data(data, image_size=image_size, mean=mean_t, std=std_t)
        total = len(dataset) if samples is None else min(max(samples, 0), len(dataset))
        bar, advance = progress_bar(total, "diagnosing")
        with bar, torch_threads(threads):
            result = diagnose(m, dataset, t, samples=samples, batch_size=batch_size, noise=noise,
                              noise_mode=noise_mode, noise_seed=noise_seed, noise_samples=noise_samples,
                              progress=advance)
        _write(result, png, page, model, force)
        _render(result, as_json, model, png, page)


def _write(result, png, page, model: str, force: bool) -> None:
    from normsurgeon.diagnosis.html import write_html
    from normsurgeon.diagnosis.plot import write_png

    if png is not None:
        write_png({model: result}, png, title=f"diagnose {model}", force=force)
    if page is not None:
        write_html(result, page, title=f"normsurgeon diagnose {model}", force=force)


def _render(result, as_json: bool, model: str, png, page) -> None:
    from normsurgeon.diagnosis.table import LEGEND, layers_table

    report = result.report
    written = {k: str(p) for k, p in (("plot", png), ("html", page)) if p is not None}
    if as_json:
        common.print_json({"model": model, **report, **written}, "diagnose")
        return
    out = common.console()
    out.print(layers_table(result, f"diagnose {model} on {report['data']} ({report['samples']} samples)"))
    summary = ", ".join(f"{n} {v}" for v, n in report["summary"].items())
    out.print(f"[bold]{summary}[/]")
    for r in result.layers:
        if r["verdict"] != "ok":
            out.print(f"  {common.escape(r['name'])}: {r['verdict']} ({common.escape(r['reason'])})")
    out.print(f"[dim]{LEGEND}[/]")
    if report.get("noise"):
        out.print(f"noise: {report['noise']} ({report['noise_mode']}, seed {report['noise_seed']})")
    for k, v in written.items():
        out.print(f"{k}: {v}")
