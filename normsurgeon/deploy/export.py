"""``export_onnx``: fold, export, optimize, check and (optionally) verify an ONNX graph.

Pipeline: fold in PyTorch (BN and weight standardization never reach the file) ->
``torch.onnx.export`` (dynamo by default, opset 20 so GroupNorm keeps the InstanceNorm form ORT runs
natively; the TorchScript exporter is the fallback, is ~1.5x faster to run and does opsets below 18,
which the dynamo exporter silently raises to 18) -> constant folding to a fixed point (no node with only
constant inputs is left) -> the GroupNorm form -> ``onnx.checker`` -> ONNX Runtime parity against the
unfolded PyTorch model.

Everything is written to a temporary folder beside the target and renamed at the end, so a failed
export or a failed ``verify`` leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normsurgeon.errors import ExportError, ModelSpecError, VerificationError, first_line
from normsurgeon.report import Reported

EXTERNAL_DATA_BYTES = 1536 << 20  # above this the weights go to PATH.data (protobuf's limit is 2 GiB)
TOLERANCE = {False: 1e-4, True: 1e-2}  # max |ort - torch| / max |torch|, fp32 / fp16
EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # torch's dynamo exporter writes opset >= 18 (it silently upgrades lower requests)
TORCHSCRIPT_MAX_OPSET = 20


@dataclass
class ExportReport(Reported):
    path: str
    data_path: str | None
    exporter: str
    opset: int
    input_shape: list[int]
    dynamic_batch: bool
    fp16: bool
    folded: bool
    channel_affine: str
    fold: dict[str, Any] | None = None
    nodes: dict[str, int] = field(default_factory=dict)
    batchnorm_nodes: int = 0
    constant_nodes: int = 0
    groupnorm_nodes: int = 0
    checker: str = ""
    bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    graph: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    input_shape_from: str = "given"  # given | recorded | model config | guessed from the first layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_onnx(
    model,
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | list[int] | None = None,
    example_inputs=None,
    opset: int = 20,
    dynamic_batch: bool = True,
    fp16: bool = False,
    fold: bool = True,
    verify: bool = False,
    exporter: str = "auto",
    channel_affine: str = "conv",
    groupnorm: str = "instancenorm",
    keep: tuple[str, ...] | list[str] = (),
    external_data: bool | None = None,
    force: bool = False,
) -> ExportReport:
    """Export ``model`` (eval mode) to ``path``. See the module docstring for the pipeline.

    ``exporter``: auto (dynamo, falling back to TorchScript if dynamo fails; TorchScript below opset 18),
    dynamo (opset 18 and later) or torchscript (opset 20 at most). The written file's opset is checked
    to be ``opset``.
    ``channel_affine``: conv (per-channel Mul/Add pairs, e.g. GroupNorm's affine or fold's leftover
    ChannelAffine, as one depthwise 1x1 Conv: fastest on ORT CPU) or mul-add (the exporter's form, which
    ORT's CUDA GroupNorm fusion matches).
    ``groupnorm``: instancenorm (default: the exporter's Reshape -> InstanceNormalization -> Reshape) or
    nchw (4-D form that keeps ORT CPU's NCHWc conv layout, deploy/gn_forms.py; slower on ResNet-50).
    ``verify``: raise VerificationError when ONNX Runtime (CPU) differs from PyTorch by more than 1e-4
    (fp32) / 1e-2 (fp16) relative; the measured errors are in the report either way.
    ``example_inputs``: a tensor, tuple or dict of tensors to export with instead of a random
    ``input_shape`` probe; the ONNX inputs are then named ``input_0``.. (or by dict key; a single
    tensor keeps ``input``), integer inputs stay integer, and verification feeds every input.
    """
    import torch

    from normsurgeon.deploy import onnx_opt
    from normsurgeon.graph.inputs import call, from_example
    from normsurgeon.graph.probe import input_shape_and_source, probe_input
    from normsurgeon.publish import check_output, move_into_place, temp_path

    caller, was_training = model, model.training  # the caller's model goes to eval for the export, then back
    try:
        t_start = time.perf_counter()
        out = check_output(path, force, kind="onnx")
        exporter, notes = check_options(opset, exporter, channel_affine, groupnorm)
        original = model.eval()
        ex = None
        if example_inputs is not None:
            if input_shape:
                raise ModelSpecError("give either input_shape or example_inputs, not both")
            ex = from_example(example_inputs, model)
            shape, shape_from = ex.shape, "example inputs"
        else:
            shape, shape_from = input_shape_and_source(model, input_shape, batch=1)
        seconds: dict[str, float] = {}
        report = ExportReport(path=str(out), data_path=None, exporter=exporter, opset=int(opset),
                              input_shape=list(shape), dynamic_batch=dynamic_batch, fp16=fp16, folded=fold,
                              channel_affine=channel_affine, notes=notes, input_shape_from=shape_from)
        _refuse_unexportable(model, ex if ex is not None else probe_input(model, shape))
        if fold:
            from normsurgeon.passes.fold import fold as fold_pass

            t = time.perf_counter()
            probe = {"example_inputs": ex} if ex is not None else {"input_shape": shape}
            res = fold_pass(model, keep=keep, **probe)
            model = res.model
            seconds["fold"] = time.perf_counter() - t
            report.fold = {"path": res.path, "summary": res.summary(),
                           "verification": res.verification.to_dict() if res.verification else None}
            if res.verification is not None and not res.verification.ok:
                report.notes.append(f"fold changed outputs by {res.verification.max_rel_error:.1e} relative")
        model = model.eval()
        x = ex if ex is not None else probe_input(model, shape)
        with torch.no_grad():
            n_out = len(_flatten(call(model, x)))
        out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]

        t = time.perf_counter()
        proto, used = _export(model, x, int(opset), dynamic_batch, exporter, out_names, report.notes)
        report.exporter = used
        if dynamic_batch and not _symbolic_batch(proto):
            dynamic_batch = report.dynamic_batch = False
            report.notes.append(f"the {used} exporter fixed the batch at {shape[0]} (the model's code specializes "
                                "it): the file takes that batch only")
        seconds["export"] = time.perf_counter() - t

        t = time.perf_counter()
        proto, graph_info = onnx_opt.optimize(proto, channel_affine=channel_affine, groupnorm=groupnorm)
        if fp16:
            proto = _to_fp16(proto)
        seconds["optimize"] = time.perf_counter() - t
        report.graph = graph_info
        report.nodes = onnx_opt.op_histogram(proto)
        report.batchnorm_nodes = report.nodes.get("BatchNormalization", 0)
        report.constant_nodes = len(onnx_opt.constant_nodes(proto))
        report.groupnorm_nodes = onnx_opt.groupnorm_count(proto)
        if report.batchnorm_nodes:
            report.notes.append(f"{report.batchnorm_nodes} BatchNormalization node(s) remain"
                                + (" (layers kept or not foldable; see `normsurgeon fold`)" if fold else " (--no-fold)"))

        written = _default_opset(proto)
        if written != int(opset):  # never report an opset the file does not have
            raise ExportError(f"the {used} export came out at opset {written}, not the requested {opset}; "
                              f"nothing written: ask for --opset {written} or try another --exporter")

        with temp_path(out, folder=True) as tmpdir:
            tmp = tmpdir / out.name
            size = sum(len(t.raw_data) for t in proto.graph.initializer)
            ext = external_data if external_data is not None else size > EXTERNAL_DATA_BYTES
            _save(proto, tmp, ext)
            import onnx

            t = time.perf_counter()
            onnx.checker.check_model(str(tmp))
            report.checker = "ok"
            seconds["check"] = time.perf_counter() - t
            if verify:
                t = time.perf_counter()
                report.verification = _verify(original, tmp, shape, dynamic_batch, fp16, ex)
                seconds["verify"] = time.perf_counter() - t
                if report.verification.get("problem"):
                    raise VerificationError(f"{report.verification['problem']}; nothing written")
                if not report.verification["ok"]:
                    v = report.verification
                    raise VerificationError(
                        f"ONNX Runtime output differs from PyTorch by {v['max_rel_error']:.2e} relative "
                        f"(max abs {v['max_abs_error']:.2e}, limit {v['tolerance']:.0e}); nothing written")
            data = tmp.with_name(tmp.name + ".data")
            if data.exists():
                out_data = out.with_name(out.name + ".data")
                move_into_place(data, out_data, force)
                report.data_path = str(out_data)
            try:
                move_into_place(tmp, out, force)
            except BaseException:
                if report.data_path:
                    Path(report.data_path).unlink()
                raise
        report.bytes = out.stat().st_size + (Path(report.data_path).stat().st_size if report.data_path else 0)
        seconds["total"] = time.perf_counter() - t_start
        report.seconds = {k: round(v, 3) for k, v in seconds.items()}
        return report
    finally:
        caller.train(was_training)


def _refuse_unexportable(model, probe) -> None:
    """Stop before any work, with one reason, on models whose outputs ONNX cannot describe: a model
    that fails on the probe is the input shape's fault (ProbeError); a detection model (a per-image
    list of dicts whose box count depends on the data, decided by Python loops and NMS) is refused."""
    from normsurgeon.graph.probe import run_probe

    x, out = run_probe(model, probe)
    if isinstance(x, list) or (isinstance(out, (list, tuple)) and out and all(isinstance(o, dict) for o in out)):
        raise ExportError(
            f"cannot export {type(model).__name__}: it returns one dict of detections per image, whose sizes "
            "depend on the data (box filtering and NMS in Python); export its backbone instead "
            "(a factory returning model.backbone)")
    if not _flatten(out):
        raise ExportError(f"cannot export {type(model).__name__}: its output holds no floating-point tensor")


def _flatten(out):
    """Floating tensors of a model output in the order torch.onnx emits them (dicts in insertion order)."""
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_options(opset: int, exporter: str, channel_affine: str = "conv",
                  groupnorm: str = "instancenorm") -> tuple[str, list[str]]:
    """Refuse bad export options before any work. Returns the exporter to run (auto becomes torchscript
    below the dynamo exporter's lowest opset) and a note saying so."""
    from normsurgeon.deploy import onnx_opt
    from normsurgeon.deploy.gn_forms import FORMS as GN_FORMS

    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    if channel_affine not in onnx_opt.CHANNEL_AFFINE_FORMS:
        raise ExportError(f"unknown channel-affine form {channel_affine!r}: use one of "
                          f"{', '.join(onnx_opt.CHANNEL_AFFINE_FORMS)}")
    if groupnorm not in GN_FORMS:
        raise ExportError(f"unknown GroupNorm form {groupnorm!r}: use one of {', '.join(GN_FORMS)}")
    opset = int(opset)
    if not 7 <= opset <= 23:
        raise ExportError(f"opset {opset} is outside what torch.onnx exports (7..23); 20 is the default")
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later (asked {opset}); "
                          "use --exporter torchscript (or auto) for a lower opset")
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ExportError(f"the TorchScript exporter writes opset {TORCHSCRIPT_MAX_OPSET} at most (asked "
                          f"{opset}); use --exporter dynamo (or auto) or --opset {TORCHSCRIPT_MAX_OPSET}")
    if groupnorm == "nchw" and opset < 13:
        raise ExportError(f"the nchw GroupNorm form needs opset 13 or later (asked {opset}): its Resize takes "
                          "an empty roi input; use groupnorm='instancenorm' or a later opset")
    if exporter == "auto" and opset < DYNAMO_MIN_OPSET:
        return "torchscript", [f"used the TorchScript exporter: the dynamo exporter writes opset "
                               f"{DYNAMO_MIN_OPSET} or later (asked {opset})"]
    return exporter, []


def _default_opset(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _symbolic_batch(proto) -> bool:
    """Whether the graph's first input has a symbolic (named) first dimension."""
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    return bool(dims) and bool(dims[0].dim_param) and not dims[0].dim_value


def _export(model, x, opset, dynamic_batch, exporter, out_names, notes):
    """(ModelProto, exporter used). ``exporter`` and ``opset`` went through ``check_options``."""
    if exporter in ("auto", "dynamo"):
        try:
            return _dynamo(model, x, opset, dynamic_batch, out_names), "dynamo"
        except Exception as e:  # noqa: BLE001 - reported; auto falls back
            first = first_line(e)
            if exporter == "dynamo":
                raise ExportError(f"torch.onnx dynamo export failed ({type(e).__name__}: {first}); "
                                  "try --exporter torchscript") from None
            if opset > TORCHSCRIPT_MAX_OPSET:
                raise ExportError(f"torch.onnx dynamo export failed ({type(e).__name__}: {first}); the "
                                  f"TorchScript fallback stops at opset {TORCHSCRIPT_MAX_OPSET}: "
                                  f"try --opset {TORCHSCRIPT_MAX_OPSET}") from None
            notes.append(f"dynamo export failed ({type(e).__name__}: {first}); used the TorchScript exporter")
    try:
        return _torchscript(model, x, opset, dynamic_batch, out_names), "torchscript"
    except Exception as e:  # noqa: BLE001
        first = first_line(e)
        raise ExportError(f"torch.onnx export failed ({type(e).__name__}: {first})") from None


@contextlib.contextmanager
def _quiet():
    import logging

    buf = io.StringIO()
    prev = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
                _silence_fds():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(prev)


@contextlib.contextmanager
def _silence_fds():
    """The exporters' C++ side writes to file descriptors 1 and 2 directly (the TorchScript exporter
    prints its whole IR graph when it fails): those go to a scratch file for the duration."""
    import sys

    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no such descriptors (embedded interpreters): nothing to silence
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _onnx_inputs(model, x):
    """(args, kwargs, input names, names whose first axis is the batch) for torch.onnx.export."""
    from normsurgeon.graph.inputs import Inputs

    if not isinstance(x, Inputs):
        return (x,), {}, ["input"], ["input"]
    named = [("input", x.args[0])] if len(x.args) == 1 and not x.kwargs else x.named()
    batched = [n for n, t in named if t.dim() and t.shape[0] == x.batch]
    return tuple(x.args), dict(x.kwargs), [n for n, _ in named], batched


def _dynamo(model, x, opset, dynamic_batch, out_names):
    import inspect

    import torch

    args, kwargs, names, batched = _onnx_inputs(model, x)
    dyn = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        if kwargs or len(args) > 1:  # by the forward's parameter names
            bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
            by_name = dict(zip(names, bound))  # names follow args then kwargs, as bound does
            dyn = {p: ({0: batch} if n in batched else None) for n, p in by_name.items()}
        else:
            dyn = ({0: batch},)
    with _quiet():
        prog = torch.onnx.export(model, args, None, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                 input_names=names, output_names=out_names, dynamic_shapes=dyn, optimize=True,
                                 verbose=False)
    return prog.model_proto


def _torchscript(model, x, opset, dynamic_batch, out_names):
    import onnx
    import torch

    args, kwargs, names, batched = _onnx_inputs(model, x)
    axes = {n: {0: "batch"} for n in [*batched, *out_names]} if dynamic_batch else None
    with tempfile.TemporaryDirectory() as d, _quiet():
        p = os.path.join(d, "model.onnx")
        torch.onnx.export(model, args, p, kwargs=kwargs or None, dynamo=False, opset_version=opset,
                          input_names=names, output_names=out_names, dynamic_axes=axes, do_constant_folding=True)
        proto = onnx.load(p)
    if proto.ir_version < 4:  # opset 7-8 come as IR 3, where every weight is also a graph input
        proto.ir_version = 4
        weights = {t.name for t in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in weights]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
    return proto


def _save(proto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _to_fp16(proto):
    """fp16 weights and compute, fp32 inputs/outputs (casts at the boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from normsurgeon.deploy.onnx_opt import topological_sort

    with _quiet():
        proto = convert_float_to_float16(proto, keep_io_types=True)
    topological_sort(proto)
    return proto


def _verify(model, onnx_path: Path, shape, dynamic_batch: bool, fp16: bool, ex=None) -> dict[str, Any]:
    """ONNX Runtime (CPU EP) against the PyTorch model on fresh random inputs (on the example inputs,
    and those with sample 0 appended for the dynamic batch, when given)."""
    import torch

    from normsurgeon.deploy import ort
    from normsurgeon.graph.inputs import call
    from normsurgeon.graph.probe import probe_input
    from normsurgeon.graph.verify import uninformative

    sess = ort.session(str(onnx_path), ort.choose("cpu"))
    shapes = [tuple(shape)] + ([(shape[0] + 1, *shape[1:])] if dynamic_batch else [])
    per_output: list[dict] = []
    problem = None
    for s in shapes:
        x = probe_input(model, s, seed=1) if ex is None else _grown(ex, s[0])
        with torch.no_grad():
            refs = [r.double() for r in _flatten(call(model, x))]
        why = uninformative(refs)
        if why is not None and problem is None:  # ONNX Runtime gives outputs only: nothing else to compare
            problem = f"cannot verify the ONNX graph: the model's output on the probe {why}"
        got = [torch.from_numpy(o).double() for o in (ort.run(sess, x) if ex is None else _run_all(sess, model, x))]
        if len(got) != len(refs):
            raise VerificationError(f"the ONNX graph has {len(got)} outputs, PyTorch {len(refs)}")
        for i, (r, g) in enumerate(zip(refs, got)):
            if tuple(r.shape) != tuple(g.shape):
                raise VerificationError(f"output {i}: ONNX shape {tuple(g.shape)} != PyTorch {tuple(r.shape)}")
            if not r.numel():
                continue
            err = (r - g).abs().max().item()
            scale = r.abs().max().item() or 1.0
            l2 = ((r - g).norm() / (r.norm() or 1.0)).item()
            per_output.append({"output": i, "batch": s[0], "max_abs_error": err, "max_rel_error": err / scale,
                               "rel_l2": l2})
    tol = TOLERANCE[bool(fp16)]
    if problem is not None:
        return {"provider": "cpu", "tolerance": tol, "max_abs_error": float("nan"), "max_rel_error": float("nan"),
                "ok": False, "problem": problem, "outputs": per_output}
    worst = max(per_output, key=lambda d: d["max_rel_error"])
    return {"provider": "cpu", "tolerance": tol, "max_abs_error": max(d["max_abs_error"] for d in per_output),
            "max_rel_error": worst["max_rel_error"], "ok": worst["max_rel_error"] <= tol, "outputs": per_output}


def _grown(ex, batch: int):
    """Example inputs at ``batch`` samples: sample 0 appended to every batched input as needed."""
    n = ex.batch
    if batch == n:
        return ex
    return ex.map(lambda t: _cat_first(t, batch - n) if t.dim() and t.shape[0] == n else t)


def _cat_first(t, extra: int):
    import torch

    return torch.cat([t, t[:1].expand(extra, *t.shape[1:])], 0)


def _run_all(sess, model, x) -> list:
    """ONNX Runtime on every example input, fed by name (floats as float32, integers as they are)."""
    import numpy as np

    _, _, names, _ = _onnx_inputs(model, x)
    tensors = dict(zip(names, [t for _, t in x.named()]))
    feed = {}
    for inp in sess.get_inputs():
        if inp.name not in tensors:
            raise VerificationError(f"the ONNX graph takes an input {inp.name!r} the example inputs do not name")
        arr = tensors[inp.name].detach().cpu().numpy()
        feed[inp.name] = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr
    return sess.run(None, feed)
