"""``normsurgeon inspect``."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @common.handle_errors
    def inspect_cmd(
        model: str = common.model_arg(),
        to: str = typer.Option("gn+ws", "--to", help="Recipe whose effect the 'convert' column shows."),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        input_shape: Optional[str] = common.input_shape_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """List every normalization layer, its producer and consumers, whether torch.fx can trace the
        model, and what convert and fold would do to each layer."""
        from normsurgeon import preflight
        from normsurgeon.recipes import parse_recipe

        preflight.model_spec(model)
        parse_recipe(to)
        shape = preflight.shape(input_shape)  # every check above runs before torch is imported
        from normsurgeon.passes.inspect import inspect

        m = common.load(model, weights, trust_pickle, trust_code)
        with common.status("inspecting"):
            rep = inspect(m, to=to, input_shape=shape)
        if as_json:
            common.print_json(rep.to_dict(), "inspect")
            return
        _render(rep, model, to, verbose)


def _render(rep, model: str, to: str, verbose: bool) -> None:
    """One row per norm layer, fitting the terminal (layer names never wrapped; what convert and fold
    would do abbreviated); producers/consumers and the recipe list under ``--verbose``."""
    from rich.table import Table

    out = common.console()
    width = min(out.width, 140)
    t = Table(title=f"{model}: {len(rep.layers)} normalization layers", expand=True, width=width)
    name_width = min(max((len(layer.name) for layer in rep.layers), default=5), width // 2)
    t.add_column("layer", no_wrap=True, min_width=name_width)
    t.add_column("type", no_wrap=True, overflow="ellipsis", max_width=14)
    t.add_column("C", no_wrap=True, justify="right")
    if verbose:
        t.add_column("producer -> consumers", no_wrap=True, overflow="ellipsis", ratio=2)
    t.add_column(f"--to {to}", no_wrap=True, overflow="ellipsis", ratio=1)
    t.add_column("fold", no_wrap=True, overflow="ellipsis", ratio=1)
    for layer in rep.layers:
        row = [layer.name, layer.type, str(layer.channels or "-")]
        if verbose:
            row.append(f"{layer.producer} -> {', '.join(layer.consumers) or '-'}")
        t.add_row(*row, _short(layer.convert), _short(layer.fold))
    out.print(t)
    counts = ", ".join(f"{n} {k}" for k, n in rep.counts.items()) or "none"
    out.print(f"layers: {counts}")
    if rep.path == "fx":
        out.print("torch.fx: [green]traceable[/] (convert/fold take the fx path)")
    else:
        what = "traced, but" if rep.traceable else "not traceable"
        out.print(f"torch.fx: [yellow]{what}[/] ({common.escape(rep.trace_error or '')}); "
                  "convert/fold take the module-swap path")
    if verbose:
        rt = Table(title="recipes (convert --to)", expand=True, width=width)
        rt.add_column("recipe", no_wrap=True)
        rt.add_column("what it does", ratio=1)
        rt.add_column("fold removes it", no_wrap=True)
        for r in rep.recipes:
            rt.add_row(r["recipe"], r["summary"], r["folds"])
        out.print(rt)
    else:
        out.print("[dim]--verbose: producers, consumers and the recipes[/]")
    for note in rep.notes:
        out.print(f"note: {common.escape(note)}")


def _short(text: str | None) -> str:
    """'replaced -> GroupNorm(32, 64)' -> 'GroupNorm(32, 64)'; 'folded -> conv1 (backward)' -> 'into conv1'."""
    if not text:
        return "-"
    action, _, rest = text.partition(" -> ")
    if not rest:
        return text
    if action == "folded":
        return "into " + rest.replace(" (backward)", "")
    return rest if action == "replaced" else f"{action}: {rest}"
