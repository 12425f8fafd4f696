"""``normsurgeon fold``."""
from __future__ import annotations

from typing import List, Optional

import typer

from normsurgeon.cli import common


def register(app: typer.Typer) -> None:
    @app.command("fold")
    @common.handle_errors
    def fold_cmd(
        model: str = common.model_arg(),
        output: str = common.output_opt(),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        input_shape: Optional[str] = common.input_shape_opt(),
        keep: List[str] = typer.Option([], "--keep", help="Leave layers matching this glob alone (repeatable)."),
        verify: bool = typer.Option(False, "--verify", help="Fail (nothing written) if outputs move by more than 1e-5 relative."),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """Fold BatchNorm, weight standardization and other per-channel constants into the
        neighbouring convs/linears, and save the folded model. Every fold and every leftover is listed."""
        from normsurgeon import preflight

        preflight.model_spec(model)
        shape = preflight.shape(input_shape)
        common.check_output(output, force)  # every check above runs before torch is imported
        from normsurgeon.model_io import save_model
        from normsurgeon.passes.fold import fold

        m = common.load(model, weights, trust_pickle, trust_code)
        with common.status("folding"):
            result = fold(m, input_shape=shape, keep=tuple(keep), verify=verify)
        path = save_model(result.model, output, force=force)
        extra = {"remaining BatchNorm": result.info.get("remaining_batchnorm", 0),
                 "fold seconds": result.info.get("fold_seconds")}
        common.render_result(result, "fold", as_json, str(path), extra, verbose=verbose)
