"""Weight arithmetic of folding a per-channel affine into a conv, conv-transpose or linear.

Everything is computed in float64 and cast back to the layer's dtype. Weight layouts:
Conv (O, I/g, k...), ConvTranspose (I, O/g, k...) (ao#1462, pytorch#180995: the transposed layout
is what breaks naive folds), Linear (O, I).
"""
from __future__ import annotations

import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def foldable_layer(m: nn.Module, backward: bool) -> bool:
    """torch conv/linear types, and subclasses that keep torch's forward (torchvision's Conv3DSimple
    only sets up its arguments). A subclass overriding ``forward``/``_conv_forward`` may transform its
    weight, so it is not folded into; timm's Conv2dSame only pads, so it takes output-side folds."""
    if type(m) in CONV_TYPES + CONVT_TYPES + (nn.Linear,) or _keeps_torch_forward(m):
        return True
    return backward and type(m).__name__ == "Conv2dSame" and isinstance(m, nn.Conv2d)


def _keeps_torch_forward(m: nn.Module) -> bool:
    base = next((b for b in type(m).__mro__ if b in CONV_TYPES + CONVT_TYPES + (nn.Linear,)), None)
    if base is None:
        return False
    return all(getattr(type(m), f, None) is getattr(base, f, None) for f in ("forward", "_conv_forward"))


def out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def shift_blocker(m: nn.Module) -> str | None:
    """Why a shift on the input of ``m`` cannot move into its bias (None: it can).

    A constant input ``t`` gives a constant output only when every output sees the full kernel: no
    zero padding (reflect/replicate/circular padding repeat ``t``), and never for a transpose conv
    (outputs receive different numbers of kernel taps)."""
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, CONVT_TYPES):
        return f"{type(m).__name__} sums a varying number of taps per output"
    if type(m).__name__ == "Conv2dSame":
        return "dynamic SAME zero padding"
    if m.padding_mode != "zeros" or all(p == 0 for p in m._reversed_padding_repeated_twice):
        return None
    return f"zero padding {tuple(m.padding) if not isinstance(m.padding, str) else m.padding} would see the shift"


def _set(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(m, name)
    ref = m.weight
    new = value.to(dtype=ref.dtype, device=ref.device)
    if isinstance(old, nn.Parameter) or old is None:
        setattr(m, name, nn.Parameter(new, requires_grad=ref.requires_grad))
    else:
        old.data = new


@torch.no_grad()
def fold_output(m: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``m`` compute ``scale * m(x) + shift`` (per output channel); adds a bias if needed."""
    w = m.weight.detach().double()
    s = scale.to(w.device, torch.float64)
    t = shift.to(w.device, torch.float64)
    if isinstance(m, CONVT_TYPES):
        g = m.groups
        wg = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        wg = wg * s.reshape(g, 1, -1, *([1] * (w.dim() - 2)))
        w = wg.reshape(w.shape)
    else:
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    b = m.bias.detach().double() if m.bias is not None else torch.zeros_like(s)
    _set(m, "weight", w)
    _set(m, "bias", b * s + t)


@torch.no_grad()
def fold_input(m: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    """Make ``m`` compute ``m(scale * x + shift)`` (per input channel). ``shift=None``: scale only;
    a shift needs ``shift_blocker(m) is None``."""
    w = m.weight.detach().double()
    s = scale.to(w.device, torch.float64)
    add = None
    if isinstance(m, nn.Linear):
        if shift is not None:
            add = w @ shift.to(w.device, torch.float64)
        w = w * s.reshape(1, -1)
    elif isinstance(m, CONVT_TYPES):
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        g = m.groups
        o, ipg = w.shape[0], w.shape[1]
        wg = w.reshape(g, o // g, ipg, -1)  # (g, O/g, I/g, K)
        if shift is not None:
            t = shift.to(w.device, torch.float64).reshape(g, ipg)
            add = torch.einsum("goik,gi->go", wg, t).reshape(o)
        w = (wg * s.reshape(g, 1, ipg, 1)).reshape(w.shape)
    _set(m, "weight", w)
    if add is not None:
        b = m.bias.detach().double() if m.bias is not None else torch.zeros_like(add)
        _set(m, "bias", b + add)


def compose(first: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor]):
    """The affine ``then(first(x))``."""
    (s1, t1), (s2, t2) = first, then
    return s2 * s1, s2 * t1 + t2

