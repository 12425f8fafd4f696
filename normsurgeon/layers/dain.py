"""Deep Adaptive Input Normalization (Passalis, Tefas, Kanniainen, Gabbouj, Iosifidis, "Deep Adaptive
Input Normalization for Time Series Forecasting", IEEE TNNLS 2019; reference code passalis/dain
``dain.py``, mode ``full``).

For an input sequence x of shape (N, C, L) (C features, L time steps), each sample is normalized by
its own summary statistics passed through learned layers::

    a   = W_a mean_L(x)                         adaptive shift   (W_a: C x C, init identity, no bias)
    x1  = x - a
    s   = sqrt(mean_L(x1^2) + eps)              (eps 1e-8)
    b   = W_b s                                 adaptive scale   (W_b: C x C, init identity, no bias)
    b   = 1 where b <= eps                      (the reference's guard against division by ~0)
    x2  = x1 / b
    g   = sigmoid(W_c mean_L(x2) + d)           adaptive gating  (W_c, d: torch Linear default init)
    y   = x2 * g

Every statistic is per sample: the layer is batch-independent in training and eval alike, and has no
running estimates. It is not an affine (it depends on each input), so nothing folds.

Learning rates (reference ``train_utils.py``: each sub-layer gets ``lr * <its factor>``): the class
defaults are ``mean_lr=1e-5, scale_lr=1e-5, gate_lr=1e-3``; the published LOB experiment script
(``exp_mlp.py``) uses ``mean_lr=1e-6, scale_lr=1e-3, gate_lr=10`` with RMSprop at lr 1e-4.
:meth:`param_groups` builds those groups; the factors are arguments because they depend on the task.
"""
from __future__ import annotations

import torch
from torch import nn

DAIN_EPS = 1e-8  # reference
DAIN_LR_FACTORS = {"mean": 1e-5, "scale": 1e-5, "gate": 1e-3}  # reference DAIN_Layer defaults


class DAIN(nn.Module):
    def __init__(self, num_features: int, eps: float = DAIN_EPS) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.mean_layer = nn.Linear(num_features, num_features, bias=False)
        self.scaling_layer = nn.Linear(num_features, num_features, bias=False)
        self.gating_layer = nn.Linear(num_features, num_features)
        with torch.no_grad():
            self.mean_layer.weight.copy_(torch.eye(num_features))
            self.scaling_layer.weight.copy_(torch.eye(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"DAIN expects (N, C, L) input, got shape {tuple(x.shape)}")
        shift = self.mean_layer(x.mean(dim=2))
        x = x - shift.unsqueeze(2)
        std = torch.sqrt((x * x).mean(dim=2) + self.eps)
        scale = self.scaling_layer(std)
        scale = torch.where(scale <= self.eps, torch.ones_like(scale), scale)
        x = x / scale.unsqueeze(2)
        gate = torch.sigmoid(self.gating_layer(x.mean(dim=2)))
        return x * gate.unsqueeze(2)

    def param_groups(self, lr: float, factors: dict[str, float] | None = None) -> list[dict]:
        """Optimizer groups giving each sub-layer ``lr * factor`` (keys mean, scale, gate)."""
        f = {**DAIN_LR_FACTORS, **(factors or {})}
        return [
            {"params": list(self.mean_layer.parameters()), "lr": lr * f["mean"]},
            {"params": list(self.scaling_layer.parameters()), "lr": lr * f["scale"]},
            {"params": list(self.gating_layer.parameters()), "lr": lr * f["gate"]},
        ]

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
