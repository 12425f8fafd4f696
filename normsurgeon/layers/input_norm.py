"""Online BN-based input normalization ("Revisiting Batch Normalization", Davis & Frank, ECCV 2022;
osu-cvl/revisiting-bn ``networks.py``): a BatchNorm over the input channels, prepended to the network
instead of dataset mean/std normalization.

gamma starts at 0.1 * 0.58 = 0.058 (0.58 ~ std of ReLU(z), z ~ N(0, 1): sqrt(1/2 - 1/(2 pi)) = 0.5838),
**beta is frozen at 0** (a buffer here), eps 1e-5, momentum 0.1; batch statistics in training,
running statistics at eval (then a constant per-channel affine *before* conv1: its shift cannot fold
exactly into a zero-padded conv). Train gamma at lr/100 (see ``normsurgeon.training``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.layers.moments import MeanVarMoments, running_affine

INPUT_NORM_GAMMA = 0.1 * 0.58  # revisiting-bn networks.py: bn_weight * 0.58


class InputNorm(MeanVarMoments, nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 gamma: float = INPUT_NORM_GAMMA) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.full((num_features,), float(gamma)))
        self.register_buffer("bias", torch.zeros(num_features))  # frozen at 0
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return running_affine(self)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, beta frozen at 0"
