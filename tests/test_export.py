"""export_onnx: folded, optimized, checked graphs that ONNX Runtime (CPU EP) runs like PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.deploy import export as export_mod
from normsurgeon.deploy import onnx_opt
from normsurgeon.errors import OutputExistsError, VerificationError
from normsurgeon.layers import WSConv2d
from tests.util import randomize_norm_stats


def _ort(path, x: torch.Tensor):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _rel(ref: torch.Tensor, got: np.ndarray) -> float:
    r = ref.double().numpy()
    return float(np.abs(r - got).max() / np.abs(r).max())


def _tiny_bn(c=8):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1, groups=2), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5), nn.BatchNorm1d(5))


class GNWS(nn.Module):
    """A gn+ws block stack built from normsurgeon's layers (independent of the convert pass)."""

    def __init__(self):
        super().__init__()
        self.c1 = WSConv2d.from_conv(nn.Conv2d(3, 16, 3, padding=1, bias=False))
        self.g1 = nn.GroupNorm(4, 16)
        self.c2 = WSConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1, bias=False), form="std")
        self.g2 = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y = torch.relu(self.g1(self.c1(x)))
        y = torch.relu(self.g2(self.c2(y)) + y)
        return self.head(y.mean((2, 3)))


def _gnws():
    m = GNWS().eval()
    with torch.no_grad():
        for g in (m.g1, m.g2):
            g.weight.uniform_(0.5, 1.5)
            g.bias.normal_()
    return m


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_bn_model_exports_without_bn_or_constant_nodes(tmp_path, exporter):
    model = randomize_norm_stats(_tiny_bn()).eval()
    rep = normsurgeon.export_onnx(model, tmp_path / "m.onnx", input_shape=(2, 3, 16, 16), exporter=exporter,
                                  verify=True)
    assert rep.exporter == exporter and rep.checker == "ok"
    assert rep.batchnorm_nodes == 0 and rep.constant_nodes == 0
    assert rep.fold["summary"] == {"folded": 3}
    assert rep.verification["ok"] and rep.verification["max_rel_error"] < 1e-4
    x = torch.randn(2, 3, 16, 16) * 3
    with torch.no_grad():
        ref = model(x)
    assert _rel(ref, _ort(tmp_path / "m.onnx", x)) < 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert onnx_opt.constant_nodes(proto) == [] and "BatchNormalization" not in onnx_opt.op_histogram(proto)


def test_no_fold_keeps_bn_and_says_so(tmp_path):
    model = randomize_norm_stats(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    rep = normsurgeon.export_onnx(model, tmp_path / "a.onnx", input_shape=(1, 3, 8, 8), fold=False,
                                  exporter="torchscript")
    assert rep.batchnorm_nodes == 1 and any("BatchNormalization" in n for n in rep.notes)
    rep = normsurgeon.export_onnx(model, tmp_path / "b.onnx", input_shape=(1, 3, 8, 8), exporter="torchscript",
                                  verify=True)
    assert rep.batchnorm_nodes == 0 and rep.verification["ok"]


@pytest.mark.parametrize("form", ["conv", "mul-add"])
def test_gn_ws_model_exports_plain_convs_and_instancenorm(tmp_path, form):
    model = _gnws()
    rep = normsurgeon.export_onnx(model, tmp_path / "g.onnx", input_shape=(1, 3, 12, 12), channel_affine=form,
                                  exporter="torchscript", verify=True)
    assert rep.constant_nodes == 0 and rep.groupnorm_nodes == 2
    assert rep.fold["summary"] == {"folded": 2, "kept": 2}  # WS precomputed; GroupNorm stays
    ops = rep.nodes
    assert ops["InstanceNormalization"] == 2
    if form == "conv":
        assert ops["Conv"] == 4 and "Mul" not in ops  # 2 convs + 2 GroupNorm affines
    else:
        assert ops["Conv"] == 2 and ops["Mul"] == 2
    x = torch.randn(1, 3, 12, 12) + 2.0
    with torch.no_grad():
        ref = model(x)
    assert _rel(ref, _ort(tmp_path / "g.onnx", x)) < 1e-4


def test_ws_subgraph_never_reaches_the_file_even_without_fold(tmp_path):
    """Without fold the WS arithmetic is exported; constant folding must still leave no constant-only
    node (onnxscript's folder skips tensors over 8,192 elements)."""
    model = nn.Sequential(WSConv2d.from_conv(nn.Conv2d(64, 128, 3, padding=1)), nn.ReLU()).eval()
    assert model[0].weight.numel() > 8192
    rep = normsurgeon.export_onnx(model, tmp_path / "w.onnx", input_shape=(1, 64, 8, 8), fold=False, verify=True)
    assert rep.constant_nodes == 0 and rep.nodes == {"Conv": 1, "Relu": 1}
    assert rep.verification["ok"]


def test_dynamic_batch_and_external_data(tmp_path):
    model = randomize_norm_stats(_tiny_bn()).eval()
    out = tmp_path / "d.onnx"
    rep = normsurgeon.export_onnx(model, out, input_shape=(2, 3, 16, 16), dynamic_batch=True,
                                  external_data=True, exporter="torchscript", verify=True)
    assert rep.data_path and (tmp_path / "d.onnx.data").is_file()
    assert [v["batch"] for v in rep.verification["outputs"]] == [2, 3]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    assert _rel(ref, _ort(out, x)) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "d.onnx.data"]


def test_fp16_export_within_1e_2(tmp_path):
    model = randomize_norm_stats(_tiny_bn()).eval()
    rep = normsurgeon.export_onnx(model, tmp_path / "h.onnx", input_shape=(2, 3, 16, 16), fp16=True,
                                  exporter="torchscript", verify=True)
    assert rep.verification["tolerance"] == 1e-2 and rep.verification["ok"]
    proto = onnx.load(str(tmp_path / "h.onnx"))
    conv_w = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    assert conv_w.data_type == onnx.TensorProto.FLOAT16


def test_existing_output_and_failed_verify_write_nothing(tmp_path, monkeypatch):
    model = randomize_norm_stats(_tiny_bn()).eval()
    (tmp_path / "x.onnx").write_text("keep me")
    with pytest.raises(OutputExistsError):
        normsurgeon.export_onnx(model, tmp_path / "x.onnx", input_shape=(1, 3, 8, 8))
    assert (tmp_path / "x.onnx").read_text() == "keep me"
    monkeypatch.setattr(export_mod, "TOLERANCE", {False: -1.0, True: -1.0})
    with pytest.raises(VerificationError, match="nothing written"):
        normsurgeon.export_onnx(model, tmp_path / "y.onnx", input_shape=(1, 3, 8, 8), exporter="torchscript",
                                verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


ZOO = ["torchvision:resnet18", "torchvision:densenet121", "torchvision:mobilenet_v3_small", "timm:efficientnet_b0"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ZOO)
def test_zoo_onnx_parity_cpu(tmp_path, spec):
    model = randomize_norm_stats(normsurgeon.load_model(spec))
    rep = normsurgeon.export_onnx(model, tmp_path / "z.onnx", input_shape=(1, 3, 64, 64), exporter="torchscript",
                                  verify=True)
    assert rep.verification["ok"], rep.verification
    assert rep.batchnorm_nodes == 0 and rep.constant_nodes == 0


class CatBN(nn.Module):
    """DenseNet's pattern: BN after a concat cannot fold; its ChannelAffine leftover becomes a depthwise conv."""

    def __init__(self, conv=nn.Conv2d, bn=nn.BatchNorm2d):
        super().__init__()
        self.a, self.b = conv(3, 8, 3, padding=1), conv(3, 8, 1)
        self.bn = bn(16)
        self.c = conv(16, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


@pytest.mark.parametrize("dims", [1, 2])
def test_leftover_channel_affine_exports_as_depthwise_conv(tmp_path, dims):
    conv, bn, shape = (nn.Conv1d, nn.BatchNorm1d, (2, 3, 10)) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d, (2, 3, 6, 6))
    model = randomize_norm_stats(CatBN(conv, bn)).eval()
    rep = normsurgeon.export_onnx(model, tmp_path / "c.onnx", input_shape=shape, exporter="torchscript", verify=True)
    assert rep.fold["summary"] == {"affine": 1}
    assert "Mul" not in rep.nodes and rep.nodes["Conv"] == 4 and rep.graph["channel_affines_as_conv"] == 1
    assert rep.verification["ok"]


def test_opset_21_emits_the_groupnormalization_op(tmp_path):
    rep = normsurgeon.export_onnx(_gnws(), tmp_path / "g21.onnx", input_shape=(1, 3, 8, 8), opset=21,
                                  exporter="dynamo", verify=True)
    assert rep.nodes.get("GroupNormalization") == 2 and "InstanceNormalization" not in rep.nodes
    assert rep.groupnorm_nodes == 2 and rep.verification["ok"] and rep.constant_nodes == 0
