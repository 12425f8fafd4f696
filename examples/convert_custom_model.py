"""Convert your own model: per-layer recipes, kept layers, an untraceable forward, and training after.

    python examples/convert_custom_model.py

A model with data-dependent control flow cannot be traced by torch.fx; normsurgeon then swaps the
BN modules in place (guided by forward hooks) and says so in the report.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 72, 3, padding=1), nn.BatchNorm2d(72), nn.ReLU(inplace=True))
        self.body = nn.Sequential(nn.Conv2d(72, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.body(self.stem(x))
        if x.mean() > 10:  # data-dependent branch: torch.fx cannot trace this
            x = x / 2
        return self.head(x.mean((2, 3)))


def main() -> None:
    model = Net().eval()
    result = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 32, 32), layers={"head.*": "ln"})
    print(f"path: {result.path}")
    for c in result.changes:
        print(f"  {c.action:12s} {c.target:10s} {c.after:22s} {c.detail}")

    new = result.model.train()
    opt = torch.optim.SGD(new.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for step in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(new(x), y)
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
