"""A residual network of ResNet-18 width on scikit-learn's digits at 32x32, and BN-teacher training.

``digits_resnet()`` (MODEL spec ``examples.digits_resnet:digits_resnet``, run from the project root)
upsamples the 16x16 ``digits`` inputs to 32x32 inside its forward, then runs a ResNet-18-width body:
ResNet-18's stem layout (conv/2 with 64 channels, BN, ReLU, max-pool/2; a 3x3 conv instead of 7x7
for 1-channel 32x32 inputs), one basic block per stage at widths 64, 128, 256, 512 with strides 1, 2,
2, 2 (8x8 down to 1x1), global average pooling and a linear classifier. One block per stage instead
of ResNet-18's two keeps training and distillation within minutes on a small shared CPU.

``train_teacher(model, steps, seed)`` trains any digits classifier with BN to convergence on
``digits:train``: SGD momentum 0.9, lr 0.05 with cosine decay to zero, weight decay 5e-4, batch 64.

    python examples/digits_resnet.py      # trains the teacher, prints test accuracy, saves digits_resnet_bn.pt
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SPEC = "examples.digits_resnet:digits_resnet"
WIDTHS = (64, 128, 256, 512)
SIZE = 32


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self, widths=WIDTHS, classes: int = 10) -> None:
        super().__init__()
        self.up = nn.Upsample(size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(self.up(x))))


def digits_resnet() -> nn.Module:
    return DigitsResNet()


def train_teacher(model: nn.Module, steps: int = 600, seed: int = 0, lr: float = 0.05, batch: int = 64,
                  weight_decay: float = 5e-4) -> nn.Module:
    """Train ``model`` (with BN) on digits:train to convergence (cosine lr to 0); returns it in eval mode."""
    from normsurgeon.calibrate.data import load_digits
    from normsurgeon.calibrate.digits_cnn import fit_digits

    g = torch.Generator().manual_seed(seed)
    fit_digits(model, load_digits("train"), steps, g, lr=lr, momentum=0.9, weight_decay=weight_decay, batch=batch,
               lr_at=lambda step: lr * 0.5 * (1 + math.cos(math.pi * step / steps)))
    return model.eval()


if __name__ == "__main__":
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import normsurgeon
    from normsurgeon import provenance

    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = train_teacher(digits_resnet())
    provenance.set_source(net, SPEC)
    print(f"trained in {time.perf_counter() - t0:.0f} s; test accuracy "
          f"{normsurgeon.evaluate(net, 'digits:test')['accuracy']:.4f}")
    normsurgeon.save_model(net, "digits_resnet_bn.pt", force=True)
