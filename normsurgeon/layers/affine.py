"""A per-channel affine ``scale * x + shift`` over dim 1: what fold leaves where no conv can absorb it.

Protocol shared by fold and the recipe layers: a module whose eval-mode function is a constant
per-channel affine exposes ``eval_affine() -> (scale, shift)`` (1-D tensors of length C), or returns
None when, in its current configuration, it is not one (e.g. example-weighted BN with alpha > 0).
"""
from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"
