"""What every command shares: option definitions, error handling, rendering."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer

STATE: dict[str, Any] = {"debug": False}

# ----------------------------------------------------------------------------- shared options
MODEL_HELP = (
    "A model file written by normsurgeon, a torch.save(model) pickle (needs --trust-pickle), "
    "torchvision:NAME, timm:NAME, or package.module:callable."
)


def model_arg() -> Any:
    return typer.Argument(..., metavar="MODEL", help=MODEL_HELP, show_default=False)


def noise_opt() -> Any:
    return typer.Option(None, "--noise", help="Simulated analog noise: weight:ETA = Gaussian noise with std "
                        "ETA*max|W| per conv/linear layer.")


def noise_mode_opt() -> Any:
    return typer.Option("fixed", "--noise-mode", help="fixed: one noise instance (a given chip); resample: fresh "
                        "noise per batch (statistics for any chip).")


def noise_seed_opt() -> Any:
    return typer.Option(None, "--noise-seed", help="Noise instance (fixed) or stream (resample); default 0.")


def noise_samples_opt() -> Any:
    return typer.Option(1, "--noise-samples", help="resample: noise draws per batch (K).")


def image_size_opt() -> Any:
    return typer.Option(None, "--image-size", help="Image folders: resize and crop to this (default 224).")


def mean_opt() -> Any:
    return typer.Option(None, "--mean", help="Image folders: per-channel mean (default ImageNet's).")


def std_opt() -> Any:
    return typer.Option(None, "--std", help="Image folders: per-channel std (default ImageNet's).")


def weights_opt() -> Any:
    return typer.Option(None, "--weights", help="A state_dict to load (.pt/.pth weights-only, or .safetensors).")


def trust_opt() -> Any:
    return typer.Option(False, "--trust-pickle", help="Allow unpickling a full-module file. Unpickling runs "
                        "code from the file: only for files you trust.")


def trust_code_opt() -> Any:
    return typer.Option(False, "--trust-code", help="Allow a normsurgeon model file whose source is a "
                        "package.module:callable factory to import and run that code: only for files you trust.")


def input_shape_opt() -> Any:
    return typer.Option(None, "--input-shape", help="Probe input shape N,C,H,W (default: the model's own or a guess).")


def threads_opt() -> Any:
    return typer.Option(None, "--threads", help="CPU threads for torch (default: torch's, one per core). 1 is "
                        "often faster for small models and on a busy machine.")


def output_opt(required: bool = True) -> Any:
    return typer.Option(... if required else None, "-o", "--output", help="Where to write the result.",
                        show_default=False)


def force_opt() -> Any:
    return typer.Option(False, "--force", help="Overwrite an existing output file.")


def json_opt() -> Any:
    return typer.Option(False, "--json", help="Print one JSON object instead of tables.")


# ----------------------------------------------------------------------------- error handling
def handle_errors(fn: Callable) -> Callable:
    """Run a command and map what escapes it to one ``error:`` line and the exit-code table in
    :mod:`normsurgeon.errors`: the user's input 2, verification 3, the environment 4, our bug 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from normsurgeon.errors import NormSurgeonError, first_line

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, SystemExit):  # a deliberate exit (rich exits 1 on a closed pipe)
            raise
        except KeyboardInterrupt:
            err_console().print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None
        except BaseException as e:  # noqa: BLE001 - every failure gets its line and code
            if STATE["debug"]:
                import traceback

                traceback.print_exc()
            if not isinstance(e, NormSurgeonError):
                e = environment_problem(e) or e
            if isinstance(e, NormSurgeonError):
                err_console().print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
                raise typer.Exit(e.exit_code) from None
            err_console().print(
                f"[bold red]error:[/] internal error: {type(e).__name__}: {escape(first_line(e, 300))}; "
                "please report it (rerun with --debug for the traceback)", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def environment_problem(e: BaseException):
    """An EnvironmentProblem for failures the machine caused (out of memory, a refused or full disk)."""
    from normsurgeon.errors import EnvironmentProblem, first_line
    from normsurgeon.publish import environment_error

    if isinstance(e, MemoryError) or "out of memory" in str(e).lower() or "can't allocate memory" in str(e):
        return EnvironmentProblem(f"out of memory ({first_line(e, 120)}): use a smaller --input-shape, "
                                  "--batch-size or model, or a machine with more memory")
    if isinstance(e, OSError):
        return environment_error(e, e.filename or "the output")
    return None


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(text)


# ----------------------------------------------------------------------------- rendering
def console():
    from rich.console import Console

    return Console()


def err_console():
    from rich.console import Console

    return Console(stderr=True)


def status(message: str):
    """A spinner on stderr while a long step runs (silent when stderr is not a terminal)."""
    return err_console().status(message, spinner="dots")


def check_output(path: str, force: bool, kind: str = "model"):
    """The output checks (before any work); remembers a folder that does not exist yet, which
    publishing will create, so the summary can say so."""
    from normsurgeon.publish import check_output as check, missing_folder

    out = check(path, force, kind=kind)
    STATE["new_folder"] = missing_folder(out)
    return out


def created_folder_line() -> str | None:
    folder = STATE.get("new_folder")
    return f"created folder {folder}" if folder is not None and folder.is_dir() else None


def load(spec: str, weights: str | None, trust_pickle: bool, trust_code: bool = False):
    from normsurgeon.model_io import load_model

    with status(f"loading {spec}"):
        return load_model(spec, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)


JSON_SCHEMA_VERSION = 1  # docs/json.md: every verb's --json object


class NoProgress:
    """The context manager standing in for a progress bar off a terminal."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress_bar(total: int, label: str, unit: str = "samples"):
    """A rich progress bar on stderr with rate and time remaining; returns (context, advance). When
    stderr is not a terminal (logs, CI, pipes) there is no bar and nothing is printed."""
    if not err_console().is_terminal:
        return NoProgress(), lambda n=1: None
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s")

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), console=err_console(), transient=True)
    task = bar.add_task(label, total=total)
    return bar, lambda n=1: bar.advance(task, n)


def print_json(obj: dict, verb: str) -> None:
    """One JSON object: ``schema_version`` and ``verb`` first, then the verb's snake_case fields."""
    d = {"schema_version": JSON_SCHEMA_VERSION, "verb": verb}
    d.update((k, v) for k, v in obj.items() if k not in d)
    sys.stdout.write(json.dumps(d, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def verbose_opt() -> Any:
    return typer.Option(False, "--verbose", "-v", help="List every layer changed or left alone (always in --json).")


def changes_table(result, title: str):
    """A rich table of every change in a SurgeryResult, fitting 80 columns: layer names are never
    wrapped; what changed and why are abbreviated first."""
    from rich.table import Table

    width = min(console().width, 120)
    table = Table(title=title, show_lines=False, expand=True, width=width)
    layer_width = min(max((len(c.target) for c in result.changes), default=5), width // 2)
    table.add_column("layer", no_wrap=True, min_width=layer_width)
    table.add_column("action", no_wrap=True, min_width=max(len(c.action) for c in result.changes) if result.changes else 6)
    table.add_column("now", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("detail", no_wrap=True, overflow="ellipsis", ratio=2)
    for c in result.changes:
        table.add_row(c.target, c.action, c.after or c.before, c.detail)
    return table


def describe_change(v) -> str:
    """A verification record in words: how far the outputs moved and whether that passes."""
    rel = v.max_rel_error
    where = "" if getattr(v, "compared", "output") == "output" else f"; compared {escape(v.compared)}"
    figures = f"max rel error {rel:.2e}, max abs {v.max_abs_error:.2e}{where}"
    if v.tolerance is not None:
        verdict = "[green]ok[/]" if v.ok else "[red]FAILED[/]"
        return f"verification: outputs match within {v.tolerance:.0e} ({figures}) {verdict}"
    if rel != rel:  # NaN
        return f"outputs: not finite ({figures})"
    if rel < 1e-4:
        words = "unchanged"
    elif rel < 0.05:
        words = f"moved by {rel:.1%} of their range"
    else:
        words = f"changed by {rel:.0%} of their range: the model now computes a different function"
    return f"outputs {words} ({figures})"


def render_result(result, title: str, as_json: bool, output: str | None = None,
                  extra: dict | None = None, verbose: bool = False, hint: str | None = None) -> None:
    """Print a SurgeryResult concisely: one summary line, verification in words, ``extra`` lines and
    the output; ``verbose`` adds the table of every change. ``--json``: one object with everything
    (``output`` is the file written). ``extra``: terminal-only lines whose figures ``result.info``
    carries; ``hint``: what to do next."""
    if as_json:
        d = result.to_dict()
        d["output"] = output
        print_json(d, result.verb)
        return
    out = console()
    if verbose:
        out.print(changes_table(result, title))
    summary = ", ".join(f"{n} {a}" for a, n in result.summary().items()) or "no changes"
    more = "" if verbose or not result.changes else " [dim](--verbose lists them)[/]"
    shape, source = result.info.get("input_shape"), result.info.get("input_shape_from", "given")
    used = f"; input {','.join(map(str, shape))} {source}" if shape and source != "given" else ""
    out.print(f"[bold]{escape(title)}[/]: {summary} ({result.path}{used}){more}")
    v = result.verification
    if v is not None:
        out.print(describe_change(v))
        if v.problem:
            out.print(f"[red]{escape(v.problem)}[/]")
        if v.batch_independent is not None:
            bi = "[green]yes[/]" if v.batch_independent else "[red]no[/]"
            out.print(f"batch-independent in eval: {bi}")
        if v.note:
            out.print(f"note: {escape(v.note)}")
    for k, val in (extra or {}).items():
        out.print(f"{k}: {val}")
    if output:
        out.print(f"output: {escape(output)}{_size(output)}")
    if created_folder_line():
        out.print(escape(created_folder_line()))
    if hint:
        out.print(f"[yellow]next:[/] {escape(hint)}")


def _size(path: str) -> str:
    import os

    try:
        return f" ({os.path.getsize(path) / 1e6:.1f} MB)"
    except OSError:
        return ""
