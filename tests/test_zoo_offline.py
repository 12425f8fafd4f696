"""Zoo specs never download: every torchvision builder family builds with the network blocked and
with torch.hub's weight download made to fail (a builder that still defaults ``weights_backbone`` to
ImageNet weights would call it)."""
from __future__ import annotations

import socket

import pytest
import torch

from normsurgeon.model_io import load_model

# one builder per torchvision family; the detection/segmentation ones default weights_backbone to
# ImageNet weights in torchvision itself
FAMILIES = [
    "resnet18",  # classification
    "fasterrcnn_mobilenet_v3_large_320_fpn",  # detection (weights_backbone)
    "retinanet_resnet50_fpn",  # detection (weights_backbone, ResNet)
    "ssdlite320_mobilenet_v3_large",  # detection (weights_backbone)
    "lraspp_mobilenet_v3_large",  # segmentation (weights_backbone)
    "fcn_resnet50",  # segmentation (weights_backbone, ResNet)
    "r3d_18",  # video
    "raft_small",  # optical flow
    "quantized_mobilenet_v2",  # quantizable
    "quantized_googlenet",  # quantizable, init_weights/aux_logits
]


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_blocked_network_really_blocks(offline):
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


@pytest.mark.parametrize("name", FAMILIES)
def test_torchvision_family_builds_offline(offline, name):
    model = load_model(f"torchvision:{name}")
    assert not model.training
    assert any(p.numel() for p in model.parameters())
    assert not any(t.is_meta for t in model.state_dict().values())
