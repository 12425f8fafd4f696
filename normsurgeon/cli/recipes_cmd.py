"""``normsurgeon recipes``: every conversion recipe, one line each."""
from __future__ import annotations

import typer

from normsurgeon.cli import common


def register(app: typer.Typer) -> None:
    @app.command("recipes")
    @common.handle_errors
    def recipes_cmd(as_json: bool = common.json_opt()) -> None:
        """List the conversion recipes (--to): name, argument, batch dependence, what fold removes."""
        from normsurgeon.recipes import all_recipes

        entries = all_recipes()
        if as_json:
            common.print_json({"recipes": [
                {"name": e.name, "usage": e.usage(), "summary": e.summary, "default": e.default,
                 "batch_independent_train": e.batch_independent_train, "folds": e.folds,
                 "options": [o.name for o in e.options]} for e in entries]}, "recipes")
            return
        from rich.table import Table

        table = Table(title="recipes (--to)", expand=True, width=min(common.console().width, 120))
        table.add_column("recipe", no_wrap=True, style="bold")
        table.add_column("replaces BatchNorm with", ratio=1)
        table.add_column("training", no_wrap=True)
        table.add_column("fold", no_wrap=True)
        for e in entries:
            table.add_row(e.usage(), e.summary, "any batch" if e.batch_independent_train else "batch stats", e.folds)
        common.console().print(table)
