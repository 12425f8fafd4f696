"""Frozen BatchNorm: BN's eval-mode per-channel affine, with buffers that never update."""
from __future__ import annotations

import torch
from torch import nn

from normsurgeon.layers.moments import running_affine


class FrozenBatchNorm(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` over dim 1, any rank.

    Unlike ``torchvision.ops.FrozenBatchNorm2d`` this works for (N, C), (N, C, L), (N, C, H, W) and
    (N, C, D, H, W) inputs. All four tensors are buffers: nothing trains and nothing updates, in train
    or eval mode, so the layer is batch-independent and exactly BN's eval function.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "FrozenBatchNorm":
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight.detach())
                frozen.bias.copy_(bn.bias.detach())
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
        return frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine ``a * x + b`` this layer computes, per channel (the fold protocol)."""
        return running_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.eval_affine()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape).to(x.dtype) + shift.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
