"""The acceptance model for recalibration: a 3-conv BN CNN on scikit-learn's digits (16x16, 1 channel).

``digits_cnn()`` builds it (MODEL spec ``normsurgeon.calibrate.digits_cnn:digits_cnn``);
``train_digits_cnn(seed)`` trains it briefly (a few seconds on 2 CPU cores) on ``digits:train`` and
returns it in eval mode, with that spec as its provenance source so ``save_model`` writes a
rebuildable, weights-only file. Training is deterministic for a seed and cached per process.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from normsurgeon import provenance

SPEC = "normsurgeon.calibrate.digits_cnn:digits_cnn"
WIDTHS = (16, 32, 64)
EPOCHS = 8
BATCH = 32
LR = 3e-3


def digits_cnn(widths: tuple[int, int, int] = WIDTHS, classes: int = 10) -> nn.Sequential:
    """conv3x3-BN-ReLU (16x16) -> pool -> conv-BN-ReLU (8x8) -> pool -> conv-BN-ReLU (4x4) -> GAP -> linear."""
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(b, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c, classes),
    )


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int, epochs: int) -> dict[str, torch.Tensor]:
    from normsurgeon.calibrate.data import load_digits

    train = load_digits("train")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = digits_cnn(WIDTHS)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * -(-len(train) // BATCH))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), BATCH):
            idx = order[i:i + BATCH]
            if len(idx) < 2:
                continue
            x, y = train.take(idx)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_digits_cnn(seed: int = 0, epochs: int = EPOCHS) -> nn.Sequential:
    """A freshly trained copy of the acceptance CNN (eval mode, provenance source ``SPEC``)."""
    model = digits_cnn(WIDTHS)
    model.load_state_dict(copy.deepcopy(_trained_state(seed, epochs)))
    provenance.set_source(model, SPEC)
    return model.eval()
