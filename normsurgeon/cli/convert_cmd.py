"""``normsurgeon convert``."""
from __future__ import annotations

from typing import List, Optional

import typer
from typer.core import TyperCommand

from normsurgeon.cli import common


def _recipe_epilog() -> str:
    from normsurgeon.recipes import all_recipes

    lines = [f"[bold]{e.usage()}[/]: {e.summary}" for e in all_recipes()]
    return "Recipes:\n\n" + "\n\n".join(lines)


class _ConvertCommand(TyperCommand):
    """``--input-norm`` takes an optional value: bare ``--input-norm`` means ``--input-norm bn``.

    Typer's parser has no optional-value options, so a bare flag (last, or followed by another option)
    gets its value inserted before parsing."""

    def parse_args(self, ctx, args):
        args = list(args)
        for i, a in enumerate(args):
            if a == "--":
                break
            if a == "--input-norm" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                args.insert(i + 1, "bn")
        return super().parse_args(ctx, args)


def register(app: typer.Typer) -> None:
    @app.command("convert", epilog=_recipe_epilog(), cls=_ConvertCommand)
    @common.handle_errors
    def convert_cmd(
        model: str = common.model_arg(),
        to: str = typer.Option(..., "--to", help="Recipe NAME[:ARG], e.g. gn+ws or gn:16 (all listed below).", show_default=False),
        output: str = common.output_opt(),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        input_shape: Optional[str] = common.input_shape_opt(),
        keep: List[str] = typer.Option([], "--keep", help="Leave BN layers matching this glob alone (repeatable)."),
        layer: List[str] = typer.Option([], "--layer", help="Per-layer recipe, PATTERN=RECIPE, e.g. 'fc.*=ln' (repeatable)."),
        ws_form: str = typer.Option("var", "--ws-form", help="Weight standardization sigma: var = sqrt(var+eps), std = std+eps."),
        verify: bool = typer.Option(False, "--verify", help="Fail if frozen changes outputs or the result is batch-dependent."),
        init: Optional[str] = typer.Option(None, "--init", help="Re-initialize norm affines for training from scratch: revisited (gamma 0.1, beta 0; Davis & Frank)."),
        input_norm: Optional[str] = typer.Option(None, "--input-norm", show_default=False, metavar="[bn|dain]", help="Prepend input normalization: bare or 'bn' = online BN-based layer (gamma 0.058, beta frozen at 0); 'dain' = DAIN adaptive normalization for (N, C, L) sequences."),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """Replace BatchNorm with a batch-independent recipe and save the converted model."""
        from normsurgeon import preflight
        from normsurgeon.errors import RecipeError
        from normsurgeon.recipes import parse_recipe

        preflight.model_spec(model)
        recipe = parse_recipe(to)
        overrides = {}
        for item in layer:
            pat, sep, r = item.partition("=")
            if not sep or not pat or not r:
                raise RecipeError(f"bad --layer {item!r}: write PATTERN=RECIPE, e.g. 'fc.*=ln'")
            parse_recipe(r)
            overrides[pat] = r
        if ws_form not in ("var", "std"):
            raise RecipeError(f"bad --ws-form {ws_form!r}: use var or std")
        preflight.check_init(init)
        preflight.input_norm_kind(input_norm)
        shape = preflight.shape(input_shape)  # every check above runs before torch is imported
        common.check_output(output, force)
        from normsurgeon.model_io import save_model
        from normsurgeon.passes.convert import convert

        m = common.load(model, weights, trust_pickle, trust_code)
        opts = {"ws_form": ws_form} if ws_form != "var" else {}
        with common.status(f"converting to {recipe}"):
            result = convert(m, to, input_shape=shape, keep=tuple(keep),
                             layers=overrides, verify=verify, init=init, input_norm=input_norm, **opts)
        path = save_model(result.model, output, force=force)
        common.render_result(result, f"convert --to {recipe}", as_json, str(path), verbose=verbose,
                             hint=_next_step(result, model, str(path)))


def _next_step(result, model: str, output: str) -> str | None:
    """When the conversion changed what the model computes: how to get the function back."""
    v = result.verification
    if v is None or v.tolerance is not None or not v.max_rel_error >= 1e-3:
        return None
    return (f"normsurgeon distill {output} --teacher {model} --data DATA -o healed.pt gives the converted "
            "model back the original's function (DATA: inputs only, no labels needed)")
