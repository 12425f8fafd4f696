"""NormTracer keeps norm layers (incl. third-party BN subclasses) as leaves; try_trace never raises."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from normsurgeon.graph.probe import ProbeError, observe, parse_shape
from normsurgeon.graph.trace import try_trace
from normsurgeon.errors import ModelSpecError


def test_bn_subclass_is_a_leaf():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False)
    t = try_trace(model)
    assert t.ok
    called = {n.target for n in t.graph_module.graph.nodes if n.op == "call_module"}
    assert "bn1" in called and "bn1.act" not in called  # BatchNormAct2d is one leaf, act inside it


def test_untraceable_returns_the_reason():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    t = try_trace(Branchy())
    assert not t.ok and t.error.startswith("TraceError") and "\n" not in t.error


def test_observe_finds_producer_consumers_and_leaves_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    uses = observe(model, torch.randn(2, 3, 6, 6), nn.BatchNorm2d)
    assert uses["1"].producer == "0" and uses["1"].consumers == ["2"] and uses["1"].input_shape == (2, 4, 4, 4)
    assert model.training and model[1].num_batches_tracked.item() == 0
    with pytest.raises(ProbeError, match="probe input of shape 2,5,6,6"):
        observe(model, torch.randn(2, 5, 6, 6), nn.BatchNorm2d)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("text,want", [("1,3,224,224", (1, 3, 224, 224)), ("2x8", (2, 8)), (None, None)])
def test_parse_shape(text, want):
    assert parse_shape(text) == want


@pytest.mark.parametrize("text", ["3", "a,b", "2,0,4", "-1,3"])
def test_parse_shape_errors(text):
    with pytest.raises(ModelSpecError, match="--input-shape"):
        parse_shape(text)
