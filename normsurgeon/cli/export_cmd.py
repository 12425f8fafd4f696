"""``normsurgeon export``."""
from __future__ import annotations

from typing import List, Optional

import typer

from normsurgeon.cli import common


def register(app: typer.Typer) -> None:
    @app.command("export")
    @common.handle_errors
    def export_cmd(
        model: str = common.model_arg(),
        output: str = common.output_opt(),
        weights: Optional[str] = common.weights_opt(),
        trust_pickle: bool = common.trust_opt(),
        trust_code: bool = common.trust_code_opt(),
        input_shape: Optional[str] = common.input_shape_opt(),
        opset: int = typer.Option(20, "--opset", help="ONNX opset (20 keeps GroupNorm on ORT's native InstanceNorm path; below 18 uses the TorchScript exporter)."),
        dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="A symbolic batch dimension (default), or the batch of the input shape fixed in the graph."),
        fp16: bool = typer.Option(False, "--fp16", help="fp16 weights and compute (fp32 inputs/outputs)."),
        no_fold: bool = typer.Option(False, "--no-fold", help="Export as is, without folding first."),
        keep: List[str] = typer.Option([], "--keep", help="Layers fold leaves alone (glob, repeatable)."),
        verify: bool = typer.Option(False, "--verify", help="Run ONNX Runtime against PyTorch; fail beyond 1e-4 (fp32) / 1e-2 (fp16) relative."),
        exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo, TorchScript fallback), dynamo or torchscript."),
        channel_affine: str = typer.Option("conv", "--channel-affine", help="Per-channel affines (GroupNorm's, fold's leftovers) as a depthwise 1x1 Conv (conv, fastest on ORT CPU) or the exporter's Mul/Add (mul-add, what ORT's CUDA GroupNorm fusion matches)."),
        force: bool = common.force_opt(),
        as_json: bool = common.json_opt(),
        verbose: bool = common.verbose_opt(),
    ) -> None:
        """Fold, export to ONNX, optimize the graph (no BatchNormalization, no constant-only nodes),
        run the ONNX checker and optionally verify with ONNX Runtime."""
        from normsurgeon import preflight
        from normsurgeon.deploy.export import check_options

        preflight.model_spec(model)
        common.check_output(output, force, kind="onnx")
        check_options(opset, exporter, channel_affine)
        shape = preflight.shape(input_shape)  # every check above runs before torch is imported
        from normsurgeon.deploy.export import export_onnx

        m = common.load(model, weights, trust_pickle, trust_code)
        with common.status("exporting"):
            rep = export_onnx(m, output, input_shape=shape, opset=opset,
                              dynamic_batch=dynamic_batch, fp16=fp16, fold=not no_fold, verify=verify,
                              exporter=exporter, channel_affine=channel_affine, keep=tuple(keep), force=force)
        if as_json:
            d = rep.to_dict()
            d["output"] = d.pop("path")
            common.print_json(d, "export")
            return
        _render(rep, verbose)


def _render(rep, verbose: bool = False) -> None:
    from rich.table import Table

    out = common.console()
    out.print(f"[bold]{rep.path}[/]" + (f" + {rep.data_path}" if rep.data_path else "")
              + f" ({rep.bytes / 1e6:.1f} MB, opset {rep.opset}, {rep.exporter} exporter, input "
              + ",".join(map(str, rep.input_shape)) + ("" if rep.input_shape_from == "given" else f" {rep.input_shape_from}")
              + (", dynamic batch" if rep.dynamic_batch else "") + (", fp16" if rep.fp16 else "") + ")")
    if rep.fold:
        s = ", ".join(f"{n} {a}" for a, n in rep.fold["summary"].items()) or "nothing to fold"
        out.print(f"fold ({rep.fold['path']}): {s}")
    if verbose:  # the op histogram of the written graph
        t = Table(title="graph", show_header=True)
        t.add_column("op")
        t.add_column("count", justify="right")
        for op, n in rep.nodes.items():
            t.add_row(op, str(n))
        out.print(t)
    mark = lambda ok: "[green]ok[/]" if ok else "[red]no[/]"  # noqa: E731
    out.print(f"BatchNormalization nodes: {rep.batchnorm_nodes} {mark(rep.batchnorm_nodes == 0)}; "
              f"constant-only nodes: {rep.constant_nodes} {mark(rep.constant_nodes == 0)}; "
              f"GroupNorm layers: {rep.groupnorm_nodes}; per-channel affines: {rep.channel_affine}; "
              f"checker: {rep.checker}")
    v = rep.verification
    if v:
        out.print(f"verify (ORT {v['provider']} vs PyTorch): max rel error {v['max_rel_error']:.2e}, "
                  f"max abs {v['max_abs_error']:.2e} (limit {v['tolerance']:.0e}) {mark(v['ok'])}")
    out.print("time: " + ", ".join(f"{k} {s:.2f} s" for k, s in rep.seconds.items()))
    for n in rep.notes:
        out.print(f"note: {common.escape(n)}")
    if common.created_folder_line():
        out.print(common.escape(common.created_folder_line()))
