"""``normsurgeon distill`` (data-parallel under ``torchrun --nproc-per-node N -m normsurgeon``)."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common
from normsurgeon.cli.recalibrate_cmd import DATA_HELP, _null


def progress_bar(total: int, start: int):
    """Step, loss and ETA on stderr when it is a terminal; nothing on a pipe. Returns (context, callback)."""
    if not common.err_console().is_terminal:
        return _null(), None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TimeRemainingColumn(), console=common.err_console(), transient=True)
    task = bar.add_task("distill", total=total, completed=start, loss="-")
    return bar, lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4g}")


def register(app: typer.Typer) -> None:
    @app.command("distill")
    @common.handle_errors
    def distill_cmd(
        student: str = typer.Argument(..., metavar="STUDENT", help="The model to train (usually a convert output). "
                                      + common.MODEL_HELP, show_default=False),
        teacher: str = typer.Option(..., "--teacher", help="The model whose function the student learns (the "
                                    "original BN checkpoint or spec); never changed.", show_default=False),
        data: str = typer.Option(..., "--data", help=DATA_HELP + " Only the inputs x are used (labels, if any, only "
                                 "for reporting accuracy). inversion:N synthesizes N inputs from the teacher's BN "
                                 "statistics (data-free; needs --input-shape or a model config).", show_default=False),
        output: str = common.output_opt(),
        steps: int = typer.Option(1000, "--steps", help="Optimizer steps."),
        batch_size: int = typer.Option(64, "--batch-size", help="Samples per step (the global batch under torchrun)."),
        lr: float = typer.Option(3e-3, "--lr", help="Peak AdamW learning rate (warm-up, then cosine decay to 0)."),
        seed: int = typer.Option(0, "--seed", help="Data order (and inversion) seed."),
        loss: str = typer.Option("auto", "--loss", help="auto (KL on (N, classes) logits, MSE otherwise), kl or mse."),
        no_init: bool = typer.Option(False, "--no-init", help="Skip the moment-init stage."),
        no_mixup: bool = typer.Option(False, "--no-mixup", help="Match on the data points only (no input mixup)."),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", help="inversion:N: input shape N,C,H,W "
                                                  "(N ignored; default: the model's config)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Write OUTPUT.ckpt every K steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT.ckpt."),
        weights: Optional[str] = common.weights_opt(),
        teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="A state_dict for the teacher."),
        trust_pickle: bool = common.trust_opt(),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
    ) -> None:
        """Train a batch-independent STUDENT to reproduce a BN TEACHER's outputs (label-free distillation)."""
        from normsurgeon.calibrate import distributed
        from normsurgeon.distillation import checkpoint
        from normsurgeon.distillation.api import distill
        from normsurgeon.graph.probe import parse_shape
        from normsurgeon.model_io import check_output, save_model

        shape = parse_shape(input_shape)
        check_output(output, force)
        ckpt = checkpoint.path_for(output)
        with distributed.process_group() as (rank, world):
            s = common.load(student, weights, trust_pickle)
            t = common.load(teacher, teacher_weights, trust_pickle)
            bar, advance = progress_bar(steps, 0) if rank == 0 else (_null(), None)
            with bar:
                result = distill(s, t, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                                 init=not no_init, mixup=not no_mixup, input_shape=shape, device=device, checkpoint=ckpt,
                                 checkpoint_every=checkpoint_every, resume=resume, progress=advance)
            if rank != 0:
                return
            path = save_model(result.model, output, force=force)
            checkpoint.remove(ckpt)
        report = dict(result.report, output=str(path))
        if as_json:
            common.print_json(report)
            return
        render(report)


def render(report: dict) -> None:
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    table = Table(title=f"distill on {report['data']} ({report['steps']} steps, batch {report['batch_size']}, "
                        f"{report['seconds']:.1f} s)")
    for col in ("stage", "loss start", "loss end", "agreement start", "agreement end", "accuracy start",
                "accuracy end", "seconds"):
        table.add_column(col)
    for st in report["stages"]:
        table.add_row(st["name"], f"{st['loss_start']:.4g}", f"{st['loss_end']:.4g}", pct(st["agreement_start"]),
                      pct(st["agreement_end"]), pct(st["accuracy_start"]), pct(st["accuracy_end"]),
                      f"{st['seconds']:.1f}")
    out = common.console()
    out.print(table)
    if report["teacher_accuracy"] is not None:
        out.print(f"teacher accuracy: {pct(report['teacher_accuracy'])} (on the first {report['eval_samples']} "
                  "samples of DATA)")
    out.print(f"output: {report['output']}")
