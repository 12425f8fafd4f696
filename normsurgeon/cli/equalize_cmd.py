"""``normsurgeon equalize``."""
from __future__ import annotations

from typing import Optional

import typer

from normsurgeon.cli import common


def register(app: typer.Typer) -> None:
    @app.command("equalize")
    @common.handle_errors
    def equalize_cmd(
        model: str = common.model_arg(),
        output: str = common.output_opt(),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        input_shape: Optional[str] = common.input_shape_opt(),
        iters: int = typer.Option(10, "--iters", min=0, help="Sinkhorn sweeps over all layer pairs."),
        c: float = typer.Option(1.0, "--c", help="ENorm asymmetry: 1 minimizes the plain L2 norm of the weights (the reference trained with 1.1 for conv nets)."),
        verify: bool = typer.Option(False, "--verify", help="Fail if outputs change by more than 1e-5 relative."),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """Equi-normalize: rescale channels through ReLU-like activations to minimize the weights' L2 norm (function-preserving)."""
        from normsurgeon import preflight

        preflight.model_spec(model)
        shape = preflight.shape(input_shape)
        preflight.positive(c, "--c")
        common.check_output(output, force)  # every check above runs before torch is imported
        from normsurgeon.model_io import save_model
        from normsurgeon.passes.equalize import equalize

        m = common.load(model, weights, trust_pickle, trust_code)
        with common.status("equalizing"):
            result = equalize(m, iters=iters, c=c, verify=verify, input_shape=shape)
        path = save_model(result.model, output, force=force)
        info = result.info
        common.render_result(result, "equalize", as_json, str(path), {
            "weight L2 norm": f"{info['weight_norm_before']:.6g} -> {info['weight_norm_after']:.6g}",
        }, verbose=verbose)
