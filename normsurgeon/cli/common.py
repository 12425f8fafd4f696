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


def weights_opt() -> Any:
    return typer.Option(None, "--weights", help="A state_dict to load (.pt/.pth weights-only, or .safetensors).")


def trust_opt() -> Any:
    return typer.Option(False, "--trust-pickle", help="Allow unpickling a full-module file. Unpickling runs "
                        "code from the file: only for files you trust.")


def input_shape_opt() -> Any:
    return typer.Option(None, "--input-shape", help="Probe input shape N,C,H,W (default: the model's own or a guess).")


def output_opt(required: bool = True) -> Any:
    return typer.Option(... if required else None, "-o", "--output", help="Where to write the result.",
                        show_default=False)


def force_opt() -> Any:
    return typer.Option(False, "--force", help="Overwrite an existing output file.")


def json_opt() -> Any:
    return typer.Option(False, "--json", help="Print one JSON object instead of tables.")


# ----------------------------------------------------------------------------- error handling
def handle_errors(fn: Callable) -> Callable:
    """Run a command; a NormSurgeonError becomes one ``error:`` line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from normsurgeon.errors import NormSurgeonError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except NormSurgeonError as e:
            if STATE["debug"]:
                raise
            err_console().print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console().print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - a bug: say so in one line unless --debug
            if STATE["debug"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            err_console().print(
                f"[bold red]error:[/] internal error ({type(e).__name__}: {escape(first)}); "
                "rerun with --debug for the traceback and report it", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


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


def load(spec: str, weights: str | None, trust_pickle: bool):
    from normsurgeon.model_io import load_model

    with status(f"loading {spec}"):
        return load_model(spec, weights=weights, trust_pickle=trust_pickle)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def changes_table(result, title: str):
    """A rich table of every change in a SurgeryResult."""
    from rich.table import Table

    table = Table(title=title, show_lines=False, expand=False)
    for col in ("layer", "action", "before", "after", "detail"):
        table.add_column(col, overflow="fold")
    for c in result.changes:
        table.add_row(c.target, c.action, c.before, c.after, c.detail)
    return table


def render_result(result, title: str, as_json: bool, extra: dict | None = None) -> None:
    """Print a SurgeryResult: its change table, summary and verification, or one JSON object."""
    if as_json:
        d = result.to_dict()
        d.update(extra or {})
        print_json(d)
        return
    out = console()
    out.print(changes_table(result, title))
    summary = ", ".join(f"{n} {a}" for a, n in result.summary().items()) or "no changes"
    out.print(f"[bold]{summary}[/] (path: {result.path})")
    v = result.verification
    if v is not None:
        tol = f" (limit {v.tolerance:.0e})" if v.tolerance is not None else " (not function-preserving by design)"
        mark = "[green]ok[/]" if v.ok else "[red]FAILED[/]"
        where = "" if v.compared == "output" else f" ({escape(v.compared)})"
        out.print(f"verification{where}: max rel error {v.max_rel_error:.2e}, max abs {v.max_abs_error:.2e}{tol} {mark}")
        if v.problem:
            out.print(f"[red]{escape(v.problem)}[/]")
        if v.batch_independent is not None:
            bi = "[green]yes[/]" if v.batch_independent else "[red]no[/]"
            out.print(f"batch-independent in eval: {bi}")
        if v.note:
            out.print(f"note: {escape(v.note)}")
    for k, val in (extra or {}).items():
        out.print(f"{k}: {val}")
