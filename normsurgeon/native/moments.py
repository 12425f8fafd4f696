"""Binding for ``moments.c``: one-pass per-channel sums of a float32 CPU tensor, added to float64
accumulators in place (and, optionally, the batch mean / biased variance written out).

A :class:`ChannelSums` call returns 0 whenever the kernel cannot take a tensor (no compiled library,
not a contiguous CPU float32 tensor with the right channel count); callers then use
:func:`normsurgeon.layers.moments.moment_sums`. :class:`InPlaceNorm` is the second function of the
same library: a BN's eval-mode normalization written over its input (False when it cannot take it).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable, NamedTuple

import torch

from normsurgeon.native import build
from normsurgeon.switch import OffSwitch

ABI = 6
_P, _I = ctypes.c_void_p, ctypes.c_int64


class _Lib(NamedTuple):
    sums: Callable[..., int]
    normalize: Callable[..., int]


def _bind(lib: ctypes.CDLL | None) -> _Lib | None:
    """The C functions, or None for a missing library or another ABI version."""
    if lib is None:
        return None
    try:
        abi, sums, normalize = lib.ns_moments_abi, lib.ns_moments_f32, lib.ns_normalize_f32
    except AttributeError:
        return None
    abi.restype = ctypes.c_int
    if abi() != ABI:
        return None
    sums.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, ctypes.c_int]
    sums.restype = ctypes.c_int
    normalize.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, ctypes.c_double, ctypes.c_int]
    normalize.restype = ctypes.c_int
    return _Lib(sums, normalize)


# ``with torch_only():`` the C kernel is not used: benchmarks and tests compare the two paths
torch_only = OffSwitch()


@functools.lru_cache(maxsize=None)
def _bound() -> _Lib | None:
    return _bind(build.load("moments"))


def _lib() -> _Lib | None:
    return None if torch_only else _bound()


def kernel():
    """The bound sums function, or None (then :func:`why_not` says why)."""
    lib = _lib()
    return None if lib is None else lib.sums


def why_not() -> str:
    if kernel() is not None:
        return ""
    if torch_only:
        return "turned off in this process (normsurgeon.native.moments.torch_only)"
    return build.reason("moments") or f"moments.c does not match its binding (ABI version {ABI} expected)"


def cpu_vector(t: torch.Tensor | None, dtype: torch.dtype, c: int) -> bool:
    """``t`` is None, or a contiguous CPU vector of ``c`` values of ``dtype`` (what the kernel writes)."""
    return t is None or (t.is_cpu and t.dtype == dtype and t.is_contiguous() and t.dim() == 1 and t.numel() == c)


class ChannelSums:
    """Adds one layer's per-call input moments to fixed float64 accumulators with the C kernel.

    Built once per layer (every check on the fixed tensors is done here, their addresses kept), so
    a call costs little more than the kernel: ``sums(x)`` returns the number of values per channel
    it added, or 0 when it cannot take ``x`` (not a contiguous CPU float32 tensor with ``c``
    channels; nothing was added then). When given, ``mean_out``/``var_out`` (float32, length ``c``)
    receive each call's batch mean and biased variance. The float32 partial sums are shifted by
    each channel's first value (see moments.c), so E[x^2] - E[x]^2 keeps its digits when
    |mean| >> spread.
    """

    def __init__(self, acc_s: torch.Tensor, acc_s2: torch.Tensor, mean_out: torch.Tensor | None = None,
                 var_out: torch.Tensor | None = None) -> None:
        c = acc_s.numel()
        if c == 0 or not (cpu_vector(acc_s, torch.float64, c) and cpu_vector(acc_s2, torch.float64, c)
                and cpu_vector(mean_out, torch.float32, c) and cpu_vector(var_out, torch.float32, c)):
            raise ValueError("accumulators must be contiguous CPU float64, outputs float32, all of one length >= 1")
        self.c = c
        self._keep = (acc_s, acc_s2, mean_out, var_out)  # the addresses below stay valid while these live
        self._ptrs = tuple(None if t is None else t.data_ptr() for t in self._keep)

    def __call__(self, x: torch.Tensor) -> int:
        fn = kernel()
        if (fn is None or x.dtype != torch.float32 or not x.is_cpu or x.dim() < 2 or x.shape[1] != self.c
                or not x.is_contiguous() or x.numel() == 0 or x.is_neg()):
            return 0
        n, per = x.shape[0], x.numel() // (x.shape[0] * self.c)
        if per == 0 or fn(x.data_ptr(), n, self.c, per, *self._ptrs, torch.get_num_threads()) != 0:
            return 0
        return n * per


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class InPlaceNorm:
    """A torch BN's eval-mode normalization done in place on its input, in one C pass.

    For the statistics pass only, and only where the input is used by nothing else (see
    :mod:`normsurgeon.calibrate.inplace`): it saves the output allocation (whose first touch costs
    more than the arithmetic on large maps) and one write of the activations. ``__call__(x)``
    returns False, x untouched, when it cannot take ``x`` (then the module's own forward runs)."""

    def __init__(self, bn: torch.nn.Module) -> None:
        c = bn.num_features
        if not (cpu_vector(bn.running_mean, torch.float32, c) and cpu_vector(bn.running_var, torch.float32, c)
                and cpu_vector(bn.weight, torch.float32, c) and cpu_vector(bn.bias, torch.float32, c)):
            raise ValueError("running statistics, weight and bias must be contiguous CPU float32 vectors")
        self.bn, self.c = bn, c

    def __call__(self, x: torch.Tensor) -> bool:
        lib, bn = _lib(), self.bn
        if (lib is None or x.dtype != torch.float32 or not x.is_cpu or x.dim() < 2 or x.shape[1] != self.c
                or not x.is_contiguous() or x.numel() == 0 or x.is_neg() or x.requires_grad):
            return False
        n = x.shape[0]
        return lib.normalize(x.data_ptr(), n, self.c, x.numel() // (n * self.c), bn.running_mean.data_ptr(),
                             bn.running_var.data_ptr(), _ptr(bn.weight), _ptr(bn.bias), float(bn.eps),
                             torch.get_num_threads()) == 0
