"""DAIN against no input normalization and z-scoring on a synthetic non-stationary sequence task.

Task: 4 classes, each a stationary AR(2) process with its own coefficients (the class is in the
dynamics, not in the level). Every sequence (2 channels, 64 steps) is then made non-stationary the way
DAIN's paper motivates (financial series on different scales and regimes): a per-sequence level
(uniform in [-50, 50]) and scale (log-uniform in [0.1, 100]) per channel, plus a slow drift of both
along the sequence (the level moves by up to +-1 scale unit over the sequence, the scale grows or
shrinks by up to 1.5x). Classifier: a small 1D conv net (conv5-ReLU-conv5-ReLU-global average pool-linear, 16 channels,
no normalization layers) trained with Adam (lr 1e-3, 12 epochs, batch 32) on 2000 sequences and
tested on 1000 fresh ones.

Input normalizations compared (prepended to the same net):

- ``none``: raw inputs;
- ``zscore``: per-channel mean/std of the training set (the usual preprocessing);
- ``zscore-seq``: each sequence z-scored by its own mean/std (no learned parts; DAIN at initialisation
  minus its gate);
- ``dain``: :class:`normsurgeon.layers.DAIN` (full mode), its sub-layers trained at the reference's
  learning-rate factors (mean 1e-5, scale 1e-5, gate 1e-3 times the base lr; ``DAIN.param_groups``);
- ``dain-lr1``: DAIN with every sub-layer at the base lr (factors 1).

Run (about 3 minutes on one CPU thread):

    python benchmarks/dain_sequences.py --seeds 3 --threads 1
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

METHODS = ("none", "zscore", "zscore-seq", "dain", "dain-lr1")
CLASSES = torch.tensor([[0.9, -0.2], [0.3, 0.5], [-0.5, 0.3], [1.4, -0.8]])  # AR(2) coefficients, stationary


def make_sequences(n: int, length: int, g: torch.Generator, channels: int = 2):
    y = torch.randint(len(CLASSES), (n,), generator=g)
    phi = CLASSES[y]  # (n, 2)
    burn = 50
    e = torch.randn(n, channels, length + burn, generator=g)
    x = torch.zeros_like(e)
    for t in range(2, length + burn):
        x[:, :, t] = phi[:, :1] * x[:, :, t - 1] + phi[:, 1:] * x[:, :, t - 2] + e[:, :, t]
    x = x[:, :, burn:]
    x = x / x.std(dim=2, keepdim=True)  # unit-scale stationary part
    t = torch.linspace(0, 1, length).view(1, 1, -1)
    level = (torch.rand(n, channels, 1, generator=g) * 100 - 50)
    scale = torch.exp(torch.rand(n, channels, 1, generator=g) * math.log(1000)) * 0.1
    slope = (torch.rand(n, channels, 1, generator=g) - 0.5) * 2  # the level moves by up to +-1 scale unit
    growth = torch.exp((torch.rand(n, channels, 1, generator=g) * 2 - 1) * math.log(1.5) * t)
    return level + scale * (growth * x + slope * t), y


class ZScore(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1))
        self.register_buffer("std", std.view(1, -1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class SeqZScore(nn.Module):
    def forward(self, x):
        return (x - x.mean(dim=2, keepdim=True)) / torch.sqrt(x.var(dim=2, unbiased=False, keepdim=True) + 1e-8)


def net(channels: int = 2, width: int = 16, classes: int = len(CLASSES)) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(channels, width, 5, padding=2), nn.ReLU(),
                         nn.Conv1d(width, width, 5, padding=2), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, classes))


def run(method: str, seed: int, data, epochs: int, lr: float = 1e-3, batch: int = 32) -> float:
    from normsurgeon.layers import DAIN

    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    body = net(xtr.shape[1])
    groups = [{"params": list(body.parameters())}]
    if method == "none":
        pre = nn.Identity()
    elif method == "zscore":
        pre = ZScore(xtr.mean(dim=(0, 2)), xtr.std(dim=(0, 2)))
    elif method == "zscore-seq":
        pre = SeqZScore()
    else:
        pre = DAIN(xtr.shape[1])
        groups += pre.param_groups(lr, None if method == "dain" else {"mean": 1, "scale": 1, "gate": 1})
    model = nn.Sequential(pre, body)
    opt = torch.optim.Adam(groups, lr=lr)
    g = torch.Generator().manual_seed(seed)
    lossf = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            loss = lossf(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean()) * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.time()
    results: dict[str, list[float]] = {m: [] for m in methods}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(1000 + seed)  # a fresh data set per seed
        xtr, ytr = make_sequences(args.train, args.length, g)
        xte, yte = make_sequences(args.test, args.length, g)
        for m in methods:
            results[m].append(run(m, seed, (xtr, ytr, xte, yte), args.epochs))
    print(f"non-stationary AR(2) sequences, {len(CLASSES)} classes, {args.train} train / {args.test} test, "
          f"length {args.length}, {args.epochs} epochs, {args.seeds} seeds; test accuracy % (mean ± std); "
          f"{time.time() - t0:.0f} s")
    print("| input normalization | accuracy | per seed |")
    print("|---|---|---|")
    for m in methods:
        r = results[m]
        sd = statistics.stdev(r) if len(r) > 1 else 0.0
        print(f"| {m} | {statistics.mean(r):.1f} ± {sd:.1f} | {', '.join(f'{v:.1f}' for v in r)} |")


if __name__ == "__main__":
    main()
