"""evaluate: accuracy and loss against an independent computation, with and without noise."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon
from normsurgeon.calibrate.noise import noise_instance
from normsurgeon.errors import DataError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def test_accuracy_and_loss_match_direct_computation_with_noise_instance():
    net = _net()
    x, y = torch.randn(11, 1, 5, 5), torch.randint(0, 3, (11,))
    clean = copy.deepcopy(net.state_dict())
    for noise, seed in ((None, None), ("weight:0.5", 4)):
        rep = normsurgeon.evaluate(net, (x, y), noise=noise, noise_seed=seed, batch_size=4)
        ref = copy.deepcopy(net)
        if noise:
            mods = dict(ref.named_modules())
            with torch.no_grad():
                for name, eps in noise_instance(net, noise, seed).items():
                    mods[name].weight.add_(eps)
        with torch.no_grad():
            logits = ref(x)
        assert rep["samples"] == 11
        assert rep["correct"] == int((logits.argmax(1) == y).sum())
        assert rep["accuracy"] == pytest.approx(rep["correct"] / 11)
        assert rep["loss"] == pytest.approx(float(F.cross_entropy(logits.double(), y)), rel=1e-5)
    assert all(torch.equal(v, clean[k]) for k, v in net.state_dict().items())
    assert not net.training


def test_evaluate_needs_labels_and_a_classifier():
    net = _net()
    with pytest.raises(DataError, match="no labels"):
        normsurgeon.evaluate(net, torch.randn(4, 1, 5, 5))
    with pytest.raises(DataError, match="out of range"):
        normsurgeon.evaluate(net, (torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 7])))
    with pytest.raises(DataError, match="logits"):
        normsurgeon.evaluate(net[:2], (torch.randn(4, 1, 5, 5), torch.zeros(4, dtype=torch.int64)))
