"""Equi-normalization two ways: the function-preserving ``equalize`` verb on a zoo model, and ENorm
interleaved with SGD (one sweep after every step, momentum buffers rescaled) on a BN-free CNN.

    python examples/equalize_sgd_training.py
"""
import torch
from torch import nn

import normsurgeon
from normsurgeon.training import EqualizeCallback

res = normsurgeon.equalize(normsurgeon.load_model("torchvision:squeezenet1_1"), input_shape=(1, 3, 64, 64))
print(f"equalize squeezenet1_1: {res.summary()}; weight L2 norm "
      f"{res.info['weight_norm_before']:.2f} -> {res.info['weight_norm_after']:.2f}; "
      f"max rel error {res.verification.max_rel_error:.1e}")

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
cb = EqualizeCallback(net, opt, c=1.1, input_shape=(2, 1, 8, 8))
print("balanced pairs:", [p.producer for p in cb.plan.pairs])
for step in range(20):
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    cb.step()
print(f"after 20 steps: loss {loss.item():.3f}")
