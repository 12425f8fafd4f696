"""Graph-level passes on hand-built ONNX graphs, checked with ONNX Runtime against numpy."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from normsurgeon.deploy import onnx_opt


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _gn_graph(c=8, g=2, h=5, w=5, rng=np.random.default_rng(0)):
    """The exporter's opset-20 GroupNorm: Reshape -> InstanceNormalization -> Reshape -> Mul -> Add."""
    gamma = rng.uniform(0.5, 2, (c, 1, 1)).astype(np.float32)
    beta = rng.normal(size=(c, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (np.array([0, g, -1], np.int64), "s1"), (np.ones(g, np.float32), "one"), (np.zeros(g, np.float32), "zero"),
        (np.array([0, c, h, w], np.int64), "s2"), (gamma, "gamma"), (beta, "beta")]]
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["r1"]),
        helper.make_node("InstanceNormalization", ["r1", "one", "zero"], ["in"], epsilon=1e-5),
        helper.make_node("Reshape", ["in", "s2"], ["r2"]),
        helper.make_node("Mul", ["r2", "gamma"], ["m"]),
        helper.make_node("Add", ["m", "beta"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, h, w])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), gamma, beta


def _gn_numpy(x, g, gamma, beta, eps=1e-5):
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1).astype(np.float64)
    y = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    return np.maximum(y.reshape(x.shape) * gamma + beta, 0)


def test_gn_affine_becomes_one_depthwise_conv_exactly():
    model, gamma, beta = _gn_graph()
    x = np.random.default_rng(1).normal(3.0, 0.1, (2, 8, 5, 5)).astype(np.float32)  # large mean, small var
    assert onnx_opt.channel_affine_to_conv(model) == 1
    ops = onnx_opt.op_histogram(model)
    assert "Mul" not in ops and "Add" not in ops and ops["Conv"] == 1
    onnx.checker.check_model(model)
    expect = _gn_numpy(x, 2, gamma, beta)
    got = _run(model, x)
    assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-5


def test_gn_affine_rewrite_leaves_other_patterns_alone():
    model, _, _ = _gn_graph()
    mul = next(n for n in model.graph.node if n.op_type == "Mul")
    model.graph.node.append(helper.make_node("Identity", [mul.output[0]], ["side"]))  # Mul has 2 users now
    assert onnx_opt.channel_affine_to_conv(model) == 0


def test_constant_subgraphs_fold_to_a_fixed_point():
    w = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(2.0).reshape(()), "two")]
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float32))),
        helper.make_node("Mul", ["w", "two"], ["w2"]),  # weight-only work
        helper.make_node("Add", ["w2", "c"], ["w3"]),  # depends on a folded result
        helper.make_node("Transpose", ["w3"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert [n.op_type for n in onnx_opt.constant_nodes(model)] == ["Mul"]  # Add, Transpose only after it folds
    x = np.random.default_rng(3).normal(size=(2, 3)).astype(np.float32)
    before = _run(model, x)
    onnx_opt.fold_constants(model)
    onnx_opt.remove_unused_initializers(model)
    assert onnx_opt.constant_nodes(model) == []
    assert onnx_opt.op_histogram(model) == {"MatMul": 1}
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6)
    np.testing.assert_allclose(before, x @ (w * 2 + 1).T, rtol=1e-5)


def test_topological_sort_repairs_out_of_order_nodes():
    model, _, _ = _gn_graph()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx_opt.topological_sort(model)
    onnx.checker.check_model(model)
