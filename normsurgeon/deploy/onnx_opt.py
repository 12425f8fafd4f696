"""Post-export ONNX graph work: constant folding to a fixed point, the GroupNorm graph form, checks.

Facts this relies on (ONNX-NOTES.md §1-2): opset <= 20 exports GroupNorm as Reshape ->
InstanceNormalization -> Reshape -> Mul(gamma) -> Add(beta); onnxscript's constant folder skips inputs
over 8,192 elements, so weight-only subgraphs can survive an export; ORT's CPU EP runs convs in the
NCHWc layout and a per-channel Mul/Add pair after a GroupNorm costs two extra passes where a depthwise
1x1 Conv (with the following Relu fused by ORT) costs one (measured: benchmarks/deploy_gn_forms.py).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

GN_FORMS = ("conv-affine", "instancenorm")


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


def gn_affine_to_conv(model: onnx.ModelProto) -> int:
    """Rewrite the per-channel ``Mul(gamma) -> Add(beta)`` after each exported GroupNorm
    (InstanceNormalization -> Reshape) into one depthwise 1x1 Conv with bias. Exact: the same two
    float operations per element. Returns the number of rewrites."""
    g = model.graph
    init = {t.name: t for t in g.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def sole_user(name: str, op: str):
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op and name not in {o.name for o in g.output} else None

    def const_vec(n: onnx.NodeProto, data_in: str):
        other = [i for i in n.input if i != data_in]
        if len(n.input) != 2 or len(other) != 1 or other[0] not in init:
            return None
        arr = numpy_helper.to_array(init[other[0]])
        if arr.ndim < 2 or any(d != 1 for d in arr.shape[1:]) or arr.dtype != np.float32:
            return None
        return arr

    rewrites = 0
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    for n in g.node:
        if n.op_type not in ("InstanceNormalization",):
            continue
        r2 = sole_user(n.output[0], "Reshape")
        mul = sole_user(r2.output[0], "Mul") if r2 is not None else None
        add = sole_user(mul.output[0], "Add") if mul is not None else None
        if add is None:
            continue
        gamma, beta = const_vec(mul, r2.output[0]), const_vec(add, mul.output[0])
        if gamma is None or beta is None or gamma.shape != beta.shape:
            continue
        c, spatial = gamma.shape[0], gamma.ndim  # gamma (C, 1, ..., 1): input rank = ndim + 1
        w_name, b_name = f"{mul.name or mul.output[0]}_dw_weight", f"{add.name or add.output[0]}_dw_bias"
        g.initializer.append(numpy_helper.from_array(gamma.reshape(c, 1, *([1] * (spatial - 1))), w_name))
        g.initializer.append(numpy_helper.from_array(beta.reshape(c), b_name))
        conv = helper.make_node("Conv", [r2.output[0], w_name, b_name], [add.output[0]],
                                name=f"{mul.name or mul.output[0]}_gn_affine", group=c,
                                kernel_shape=[1] * (spatial - 1))
        replace[id(mul)] = conv
        drop.add(id(add))
        rewrites += 1
    if rewrites:
        nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(nodes)
        remove_unused_initializers(model)
    return rewrites


def optimize(model: onnx.ModelProto, *, gn_form: str = "conv-affine") -> tuple[onnx.ModelProto, dict]:
    """Constant-fold to a fixed point (no size limits) and pick the GroupNorm form."""
    import onnxscript.optimizer

    before = op_histogram(model)
    big = 1 << 40
    model = onnxscript.optimizer.optimize(model, input_size_limit=big, output_size_limit=big)
    folded = fold_constants(model)
    remove_unused_initializers(model)
    gn = gn_affine_to_conv(model) if gn_form == "conv-affine" else 0
    return model, {"nodes_before": before, "constants_folded_after_export": folded, "gn_affine_to_conv": gn}


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
