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
        temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature of the KL loss. Higher "
                                          "(4-8) matches more of the teacher's logits than its top class: closer "
                                          "on long runs (2000+ steps), slower on short ones."),
        no_init: bool = typer.Option(False, "--no-init", help="Skip the moment-init stage."),
        no_mixup: bool = typer.Option(False, "--no-mixup", help="Match on the data points only (no input mixup)."),
        feature_weight: float = typer.Option(0.0, "--feature-weight", help="Weight of a layer-wise term that "
                                             "also matches the student's norm outputs to the teacher's BN outputs "
                                             "(e.g. 1); 0 matches the outputs only."),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", help="inversion:N: input shape N,C,H,W "
                                                  "(N ignored; default: the model's config)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        threads: Optional[int] = common.threads_opt(),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Write OUTPUT.ckpt every K steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT.ckpt."),
        weights: Optional[str] = common.weights_opt(),
        teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="A state_dict for the teacher."),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """Train a batch-independent STUDENT to reproduce a BN TEACHER's outputs (label-free distillation)."""
        from normsurgeon import preflight
        from normsurgeon.threads import torch_threads

        preflight.model_spec(student)
        preflight.model_spec(teacher)
        preflight.data_spec(data)
        preflight.threads(threads)
        shape = preflight.shape(input_shape)
        common.check_output(output, force)  # every check above runs before torch is imported
        from normsurgeon.calibrate import distributed
        from normsurgeon.distillation import checkpoint
        from normsurgeon.distillation.api import distill
        from normsurgeon.model_io import save_model

        ckpt = checkpoint.path_for(output)
        with distributed.process_group() as (rank, world), torch_threads(threads):
            s = common.load(student, weights, trust_pickle, trust_code)
            t = common.load(teacher, teacher_weights, trust_pickle, trust_code)
            bar, advance = progress_bar(steps, 0) if rank == 0 else (_null(), None)
            with bar:
                result = distill(s, t, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, loss=loss,
                                 temperature=temperature, init=not no_init, mixup=not no_mixup,
                                 feature_weight=feature_weight,
                                 input_shape=shape, device=device, checkpoint=ckpt,
                                 checkpoint_every=checkpoint_every, resume=resume, progress=advance)
            if rank != 0:
                return
            path = save_model(result.model, output, force=force)
            checkpoint.remove(ckpt)
        report = dict(result.report, output=str(path))
        if as_json:
            common.print_json(report, "distill")
            return
        render(report, verbose)


def render(report: dict, verbose: bool = False) -> None:
    """One summary line per figure; the per-stage table under ``--verbose``."""
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    out = common.console()
    if verbose:
        table = Table(title="stages", expand=True, width=min(out.width, 120))
        for col in ("stage", "loss", "agreement", "accuracy", "s"):
            table.add_column(col, no_wrap=True)
        for st in report["stages"]:
            table.add_row(st["name"], f"{st['loss_start']:.3g} -> {st['loss_end']:.3g}",
                          f"{pct(st['agreement_start'])} -> {pct(st['agreement_end'])}",
                          f"{pct(st['accuracy_start'])} -> {pct(st['accuracy_end'])}", f"{st['seconds']:.0f}")
        out.print(table)
    b, a = report["before"], report["after"]
    out.print(f"[bold]distill[/]: {report['steps']} steps of batch {report['batch_size']} on {report['data']} in "
              f"{report['seconds']:.0f} s" + ("" if verbose else " [dim](--verbose shows each stage)[/]"))
    out.print(f"agreement with the teacher: {pct(b['agreement'])} -> [bold]{pct(a['agreement'])}[/] (on the first "
              f"{report['eval_samples']} samples of DATA)")
    if a["accuracy"] is not None:
        out.print(f"accuracy: {pct(b['accuracy'])} -> [bold]{pct(a['accuracy'])}[/] "
                  f"(teacher {pct(report['teacher_accuracy'])})")
    out.print(f"output: {common.escape(report['output'])}")
    if common.created_folder_line():
        out.print(common.escape(common.created_folder_line()))
