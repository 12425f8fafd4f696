"""A short micro-batch training run on real digits for the layer tests (real data, eager loop)."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from normsurgeon.calibrate.data import load_digits
from normsurgeon.calibrate.digits_cnn import digits_cnn


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return digits_cnn()


@functools.lru_cache(maxsize=1)
def _test():
    return load_digits("test").take(torch.arange(len(load_digits("test"))))


def test_x() -> torch.Tensor:
    return _test()[0]


def train(model: nn.Module, batch: int = 2, steps: int = 150, lr: float = 0.02, seed: int = 0) -> float:
    """SGD (momentum 0.9) on digits:train at this batch size; returns test accuracy. Fails on NaN."""
    data = load_digits("train")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        x, y = data.take(idx)
        loss = nn.functional.cross_entropy(model(x), y)
        if not math.isfinite(loss.item()):
            raise AssertionError(f"loss is {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    return accuracy(model)


def accuracy(model: nn.Module) -> float:
    """Test accuracy on digits:test in eval mode."""
    model.eval()
    x, y = _test()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
