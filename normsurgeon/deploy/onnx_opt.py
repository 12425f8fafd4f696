"""Post-export ONNX graph work: constant folding to a fixed point, the per-channel affine form, checks.

Facts this relies on (measured; see docs/deploy.md): opset <= 20 exports GroupNorm as Reshape ->
InstanceNormalization -> Reshape -> Mul(gamma) -> Add(beta); onnxscript's constant folder skips inputs
over 8,192 elements, so weight-only subgraphs can survive an export; ORT's CPU EP runs convs in the
NCHWc layout, and a per-channel Mul/Add pair costs two extra passes (and layout reorders) where a
depthwise 1x1 Conv (with the following Relu fused by ORT) costs one (benchmarks/deploy_r50.py).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

CHANNEL_AFFINE_FORMS = ("conv", "mul-add")


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: -kv[1]))


def _const_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def constant_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes (other than Constant) whose inputs are all constants: work the runtime would redo at
    every load or every run. The target after ``optimize`` is none."""
    consts = _const_names(model)
    out = []
    for n in model.graph.node:
        ins = [i for i in n.input if i]
        if n.op_type != "Constant" and ins and all(i in consts for i in ins):
            out.append(n)
    return out


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate every all-constant node (repeatedly) and store its outputs as initializers;
    Constant nodes become initializers too. Returns the number of nodes removed."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    removed = 0
    values = {i.name: i for i in g.initializer}
    for n in [n for n in g.node if n.op_type == "Constant"]:
        t = _constant_value(n)
        if t is None:
            continue
        values[n.output[0]] = numpy_helper.from_array(t, n.output[0])
        g.initializer.append(values[n.output[0]])
        g.node.remove(n)
        removed += 1
    opset = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    while True:
        todo = [n for n in constant_nodes(model) if n.domain in ("", "ai.onnx")]
        if not todo:
            return removed
        for n in todo:
            single = helper.make_model(
                helper.make_graph([n], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in n.output],
                                  [values[i] for i in n.input if i]),
                opset_imports=opset, ir_version=model.ir_version)
            outs = ReferenceEvaluator(single).run(None, {})
            for name, arr in zip(n.output, outs):
                t = numpy_helper.from_array(np.asarray(arr), name)
                values[name] = t
                g.initializer.append(t)
            g.node.remove(n)
            removed += 1


def _constant_value(node: onnx.NodeProto):
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.asarray(helper.get_attribute_value(a),
                              dtype=np.float32 if a.name == "value_float" else np.int64)
        if a.name in ("value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(a),
                              dtype=np.float32 if a.name == "value_floats" else np.int64)
    return None


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def groupnorm_count(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization"))


def channel_affine_to_conv(model: onnx.ModelProto) -> int:
    """Rewrite each per-channel ``Mul(x, gamma) -> Add(beta)`` with constant (C, 1, ..., 1) gamma/beta on
    an (N, C, ...) tensor (GroupNorm's affine after the exporter's InstanceNorm form, fold's leftover
    ChannelAffine) into one depthwise 1x1 Conv with bias: one pass instead of two, the following Relu
    fuses into it, and on ORT's CPU EP it stays in the NCHWc layout of the surrounding convs. Exact:
    the same multiply and add per element. Returns the number of rewrites."""
    from onnx import shape_inference

    g = model.graph
    init = {t.name: t for t in g.initializer}
    try:
        inferred = shape_inference.infer_shapes(model).graph
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.input]
                 if v.type.tensor_type.HasField("shape")}
    except Exception:  # noqa: BLE001 - no shapes, no rewrite
        return 0
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def per_channel(n: onnx.NodeProto, data_in: str, rank: int | None):
        """The constant operand as (C, 1, ..., 1) for an (N, C, ...) input of ``rank``, else None."""
        other = [i for i in n.input if i != data_in]
        if rank is None or len(n.input) != 2 or len(other) != 1 or other[0] not in init:
            return None
        arr = numpy_helper.to_array(init[other[0]])
        if arr.ndim == rank and arr.shape[0] == 1:
            arr = arr.reshape(arr.shape[1:])
        if arr.ndim != rank - 1 or rank < 3 or any(d != 1 for d in arr.shape[1:]) or arr.dtype != np.float32:
            return None
        return arr

    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for mul in g.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        gamma = None
        for data in mul.input:
            gamma = per_channel(mul, data, ranks.get(data))
            if gamma is not None:
                break
        if gamma is None:
            continue
        nxt = users.get(mul.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Add" or mul.output[0] in outputs:
            continue
        add = nxt[0]
        beta = per_channel(add, mul.output[0], ranks.get(data))
        if beta is None or beta.shape != gamma.shape:
            continue
        c, spatial = gamma.shape[0], gamma.ndim - 1
        base = mul.name or mul.output[0]
        w_name, b_name = f"{base}_dw_weight", f"{base}_dw_bias"
        g.initializer.append(numpy_helper.from_array(gamma.reshape(c, 1, *([1] * spatial)), w_name))
        g.initializer.append(numpy_helper.from_array(beta.reshape(c), b_name))
        replace[id(mul)] = helper.make_node("Conv", [data, w_name, b_name], [add.output[0]],
                                            name=f"{base}_channel_affine", group=c, kernel_shape=[1] * spatial)
        drop.add(id(add))
    if replace:
        nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(nodes)
        remove_unused_initializers(model)
    return len(replace)


def optimize(model: onnx.ModelProto, *, channel_affine: str = "conv",
             groupnorm: str = "instancenorm") -> tuple[onnx.ModelProto, dict]:
    """Constant-fold to a fixed point (no size limits), pick the GroupNorm form (gn_forms.FORMS: nchw
    rewrites to 4-D ops that keep ORT's NCHWc layout but measured slower; instancenorm, the default,
    keeps the exporter's form) and the
    per-channel affine form."""
    from normsurgeon.deploy import gn_forms

    import onnxscript.optimizer

    before = op_histogram(model)
    big = 1 << 40
    model = onnxscript.optimizer.optimize(model, input_size_limit=big, output_size_limit=big)
    folded = fold_constants(model)
    remove_unused_initializers(model)
    gn4d = gn_forms.groupnorm_to_4d(model) if groupnorm == "nchw" else 0
    convs = channel_affine_to_conv(model) if channel_affine == "conv" else 0
    return model, {"nodes_before": before, "constants_folded_after_export": folded,
                   "groupnorms_as_nchw": gn4d, "channel_affines_as_conv": convs}


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (some converters append casts)."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = False
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
                progress = True
            else:
                rest.append(n)
        if not progress:  # a cycle or a dangling input: leave the rest in their order for the checker
            ordered.extend(rest)
            break
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
