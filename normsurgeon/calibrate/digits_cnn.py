"""The acceptance model for recalibration: a 3-conv BN CNN on scikit-learn's digits (16x16, 1 channel).

``digits_cnn()`` builds it (MODEL spec ``normsurgeon:digits_cnn``);
``train_digits_cnn(seed)`` trains it briefly on ``digits:train`` (about 5 epochs of SGD, 1-3 s on
one CPU core) and returns it in eval mode, with that spec as its provenance source so
``save_model`` writes a rebuildable, weights-only file. Training is deterministic for a seed and
cached per process.

Recipe (a normsurgeon choice, not from a paper): 5x5 first conv, then two 3x3 convs, each
conv-BN-ReLU, max-pooling between, global average pooling and a linear classifier; SGD with
momentum 0.9, lr 0.05, weight decay 5e-3, batch 32, 225 steps. Clean test accuracy is ~0.99 and
weight noise at eta = 0.1 (std 0.1 max|W| per layer) costs about a quarter of it. How much a
noise-agnostic (resample-mode) recalibration recovers depends on the model: in this family it grew
with weight decay (which keeps max|W| close to typical weights) and with the first conv's fan-in;
a 3x3 first conv trained without weight decay lost more to noise and gained less back.

"Briefly" matters: at a constant lr the BN running averages lag the weights, so part of what any
recalibration recovers is stale statistics. Trained to convergence (lr decayed to 0) the same CNN
gained only 0-2 points from resample-mode (noise-agnostic) recalibration at eta = 0.1, the same as
a clean recalibration; fixed-mode (per-chip) recalibration recovered ~0.99 either way.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
from torch import nn

from normsurgeon import provenance

SPEC = "normsurgeon:digits_cnn"
WIDTHS = (16, 32, 64)
FIRST_KERNEL = 5
STEPS = 225
BATCH = 32
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-3


def digits_cnn(widths: tuple[int, int, int] = WIDTHS, classes: int = 10) -> nn.Sequential:
    """conv5x5-BN-ReLU (16x16) -> pool -> conv3x3-BN-ReLU (8x8) -> pool -> conv3x3-BN-ReLU (4x4) -> GAP -> linear."""
    a, b, c = widths
    k = FIRST_KERNEL
    return nn.Sequential(
        nn.Conv2d(1, a, k, padding=k // 2, bias=False), nn.BatchNorm2d(a), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(b, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c, classes),
    )


def fit_digits(model: nn.Module, train, steps: int, g: torch.Generator, *, lr: float, momentum: float,
               weight_decay: float, batch: int, lr_at: Callable[[int], float] | None = None) -> nn.Module:
    """SGD with cross-entropy on ``train`` (a digits Dataset) for ``steps`` steps of ``batch`` samples,
    epochs in the order ``g`` draws (a remainder smaller than a batch is left out). ``lr_at(step)``,
    when given, sets the learning rate before each step. Returns ``model`` (left in train mode)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(train) - batch + 1, batch):
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
            x, y = train.take(order[i:i + batch])
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model


@functools.lru_cache(maxsize=4)
def _trained_state(seed: int, steps: int) -> dict[str, torch.Tensor]:
    from normsurgeon.calibrate.data import load_digits

    train = load_digits("train")
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is as fast, and immune to a busy machine
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = digits_cnn()
            fit_digits(model, train, steps, g, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, batch=BATCH)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_digits_cnn(seed: int = 0, steps: int = STEPS) -> nn.Sequential:
    """A freshly trained copy of the acceptance CNN (eval mode, provenance source ``SPEC``)."""
    model = digits_cnn()
    model.load_state_dict(copy.deepcopy(_trained_state(seed, steps)))
    provenance.set_source(model, SPEC)
    return model.eval()
