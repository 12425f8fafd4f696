"""gn+ws on a depthwise 1x1 conv (fan-in 1, timm MobileOne's scale branch): weight standardization of a
single weight is 0/0, so the conv is left plain and the report says why; the result stays finite."""
from __future__ import annotations

import torch
from torch import nn

import normsurgeon
from normsurgeon.layers.ws_conv import WSConv2d
from tests.util import randomize_norm_stats


def test_fan_in_one_conv_is_not_standardized():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize_norm_stats(model).eval()
    res = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 8, 8), verify=True)
    assert isinstance(res.model.get_submodule("0"), WSConv2d)
    assert type(res.model.get_submodule("3")) is nn.Conv2d
    assert "fan-in 1" in next(c.detail for c in res.changes if c.target == "4")
    with torch.no_grad():
        assert torch.isfinite(res.model(torch.randn(2, 3, 8, 8))).all()
