"""Weight-standardized convolutions (Qiao et al., "Micro-Batch Training with Batch-Channel
Normalization and Weight Standardization"; joe-siyuan-qiao/WeightStandardization).

Per output filter o: ``W_hat[o] = (W[o] - mean(W[o])) / sigma_o`` over all its input and kernel
entries. The official sources disagree on sigma; both forms are offered and the choice is stored on
the module (``ws_form``) and in normsurgeon's saved manifest:

- ``"var"`` (default, BCN repo imagenet/models/layers.py): ``sigma = sqrt(unbiased_var + eps)``.
  Stays finite for a constant filter.
- ``"std"`` (WS README's PyTorch layer): ``sigma = unbiased_std + eps``.

eps defaults to 1e-5 in both. At inference the standardized weight is a constant: ``fold`` replaces
the module by a plain conv holding ``standardize_weight(...)``, exactly.
"""
from __future__ import annotations

import torch
from torch import nn

WS_FORMS = ("var", "std")


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5, form: str = "var") -> torch.Tensor:
    """Standardize each output filter (dim 0) of a conv weight."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    if form == "var":
        sigma = torch.sqrt(flat.var(dim=1, unbiased=True, keepdim=True) + eps)
    elif form == "std":
        sigma = flat.std(dim=1, unbiased=True, keepdim=True) + eps
    else:
        raise ValueError(f"unknown weight-standardization form {form!r}; use one of {WS_FORMS}")
    return ((flat - mean) / sigma).reshape(weight.shape)


class _WSMixin:
    ws_eps: float
    ws_form: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = standardize_weight(self.weight, self.ws_eps, self.ws_form)
        return self._conv_forward(x, w, self.bias)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_form={self.ws_form}, ws_eps={self.ws_eps}"  # type: ignore[misc]

    @classmethod
    def from_conv(cls, conv: nn.Module, eps: float = 1e-5, form: str = "var"):
        """A WS conv with ``conv``'s hyper-parameters, sharing (not copying) its parameters."""
        if form not in WS_FORMS:
            raise ValueError(f"unknown weight-standardization form {form!r}; use one of {WS_FORMS}")
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.ws_eps = eps
        new.ws_form = form
        return new


class WSConv1d(_WSMixin, nn.Conv1d):
    pass


class WSConv2d(_WSMixin, nn.Conv2d):
    pass


class WSConv3d(_WSMixin, nn.Conv3d):
    pass


WS_CLASS_FOR = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}


def ws_class_for(conv: nn.Module):
    """The WS class for a plain conv (exact type match on the conv family), or None."""
    for base, ws in WS_CLASS_FOR.items():
        if isinstance(conv, base) and not isinstance(conv, _WSMixin):
            return ws
    return None
