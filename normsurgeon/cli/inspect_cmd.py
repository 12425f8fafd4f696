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
        from rich.table import Table

        t = Table(title=f"{model}: {len(rep.layers)} normalization layers")
        for col in ("layer", "type", "C", "producer -> consumers", f"convert --to {to}", "fold"):
            t.add_column(col, overflow="fold")
        for l in rep.layers:
            t.add_row(l.name, l.type, str(l.channels or "-"),
                      f"{l.producer} -> {', '.join(l.consumers) or '-'}", l.convert or "-", l.fold or "-")
        out = common.console()
        out.print(t)
        counts = ", ".join(f"{n} {k}" for k, n in rep.counts.items()) or "none"
        out.print(f"layers: {counts}")
        if rep.path == "fx":
            out.print("torch.fx: [green]traceable[/] (convert/fold take the fx path)")
        else:
            what = "traced, but" if rep.traceable else "not traceable"
            out.print(f"torch.fx: [yellow]{what}[/] ({common.escape(rep.trace_error or '')}); "
                      "convert/fold take the module-swap path")
        rt = Table(title="recipes (convert --to)")
        for col in ("recipe", "what it does", "fold removes it"):
            rt.add_column(col, overflow="fold")
        for r in rep.recipes:
            rt.add_row(r["recipe"], r["summary"], r["folds"])
        out.print(rt)
        for note in rep.notes:
            out.print(f"note: {common.escape(note)}")
