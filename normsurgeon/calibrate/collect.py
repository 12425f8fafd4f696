"""The statistics pass's instrumentation of each layer with running statistics.

On every call the layer (1) adds the input's per-channel sums to the layer's float64 accumulators and
(2) makes the layer normalize that call with the batch's own statistics (see
:mod:`normsurgeon.calibrate.recalibrate`). Two ways:

- **native**: torch BN (any ``_BatchNorm``, timm's ``BatchNormAct2d`` included) with a contiguous
  CPU float32 input and float32 running buffers: the C kernel (:mod:`normsurgeon.native.moments`)
  reads the input once, adds the sums and writes the batch mean / variance straight into the running
  buffers, which the module's own forward then normalizes with.
- **torch**: everything else (GPU, other dtypes, channels_last, normsurgeon's recipe layers, no C
  compiler): the layer's ``batch_moments`` (two torch reductions), then ``use_batch``.

Both give the same sums up to float32 rounding (~1e-7 relative; tests compare them).
"""
from __future__ import annotations

from typing import Callable

import torch

from normsurgeon.calibrate.inplace import hooked_now
from normsurgeon.calibrate.protocol import BatchNormStats
from normsurgeon.calibrate.stats import PooledMoments
from normsurgeon.native import moments as native


class Collection:
    """Instruments every layer for one statistics pass; ``close()`` restores them; ``calls`` counts
    the layer calls each way.

    The collector runs inside the layer's ``forward`` (an instance attribute wrapping the module's
    own, removed by ``close``), not as a forward pre-hook: a module with hooks takes torch's slow
    call path, which on the digits CNN cost a quarter to three quarters of the C kernel's own work.

    ``in_place`` (``{bn: producer}``, from :func:`normsurgeon.calibrate.inplace.in_place_producers`):
    those BN layers, on the native path, overwrite their input with their output when it is the very
    tensor their producer just returned (the producer's forward is wrapped to hand it over).
    """

    def __init__(self, layers, pooled: dict[str, PooledMoments], in_place=None) -> None:
        self.calls = {"native": 0, "torch": 0, "in_place": 0}
        self._undo: list[Callable[[], None]] = []
        in_place = in_place or {}
        try:
            for name, handle in layers:
                collect = self._collector(handle, pooled[name])
                producer = in_place.get(handle.module)
                take_over = None if producer is None else self._in_place(handle.module, producer)
                self._instrument(handle.module, collect, take_over)
        except BaseException:
            self.close()
            raise

    def _instrument(self, module, collect: Callable[[object], bool], take_over=None) -> None:
        own = module.forward

        def forward(*args, **kwargs):
            if args and collect(args[0]) and take_over is not None:
                out = take_over(args, kwargs)
                if out is not None:
                    return out
            return own(*args, **kwargs)

        if not self._set_forward(module, forward):  # a module that refuses attributes: the slower hook
            hook = module.register_forward_pre_hook(lambda mod, args: collect(args[0]) if args else None)
            self._undo.append(hook.remove)

    def _set_forward(self, module, forward) -> bool:
        previous = module.__dict__.get("forward")  # an instance-level forward someone set, kept as is
        try:
            object.__setattr__(module, "forward", forward)
        except (AttributeError, TypeError):
            return False
        if previous is None:
            self._undo.append(lambda: module.__dict__.pop("forward", None))
        else:
            self._undo.append(lambda: object.__setattr__(module, "forward", previous))
        return True

    def _in_place(self, bn, producer):
        """The BN's take-over: in-place normalization of the tensor ``producer`` handed over, else None."""
        norm = _in_place_norm(bn)
        if norm is None:
            return None
        handed = [None]
        own = producer.forward

        def produce(*args, **kwargs):
            out = own(*args, **kwargs)
            fresh = isinstance(out, torch.Tensor) and out._base is None and not (args and out is args[0])
            handed[0] = out if fresh else None
            return out

        if not self._set_forward(producer, produce):
            return None
        self._undo.append(lambda: handed.__setitem__(0, None))

        def take_over(args, kwargs):
            x, handed[0] = handed[0], None
            if x is None or len(args) != 1 or kwargs or args[0] is not x or hooked_now(producer, bn) or not norm(x):
                return None
            self.calls["in_place"] += 1
            return x

        return take_over

    def _collector(self, handle, acc: PooledMoments) -> Callable[[object], bool]:
        """The statistics step; True when the C kernel took it (the batch statistics are then in
        the BN's running buffers)."""
        fast = _native_sums(handle, acc)

        def collect(x) -> bool:
            if not isinstance(x, torch.Tensor):
                return False
            if fast is not None:
                n = fast(x)
                if n:
                    acc.count_batch(n)
                    self.calls["native"] += 1
                    return True
            self.calls["torch"] += 1
            s, s2, n = handle.batch_moments(x)
            acc.add(s, s2, n)
            if n > 0:
                handle.use_batch(s / n, s2 / n, n)
            return False

        return collect

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def describe(self) -> str:
        """Which kernel computed the statistics, and how many BN calls normalized in place."""
        native_calls, torch_calls = self.calls["native"], self.calls["torch"]
        in_place = self.calls["in_place"]
        tail = f"; {in_place} of {native_calls + torch_calls} layer calls normalized in place" if in_place else ""
        if torch_calls == 0:
            return ("native (one-pass C kernel)" + tail) if native_calls else "none"
        why = native.why_not() or "the C kernel takes only torch BN with contiguous CPU float32 inputs"
        text = f"torch reductions ({why})"
        total = native_calls + torch_calls
        return (text if native_calls == 0 else f"native for {native_calls} of {total} layer calls, else {text}") + tail


def _native_sums(handle, acc: PooledMoments) -> native.ChannelSums | None:
    """The C kernel for a torch BN whose running buffers are CPU float32 (it writes each batch's
    mean / variance into them), with ``acc``'s accumulators; None where it does not apply. The
    kernel is only built (on first use) for a layer that could use it."""
    if not isinstance(handle, BatchNormStats):
        return None
    mean, var = handle.module.running_mean, handle.module.running_var
    c = mean.numel()
    if c == 0 or not (native.cpu_vector(mean, torch.float32, c) and native.cpu_vector(var, torch.float32, c)):
        return None
    if native.kernel() is None:
        return None
    return native.ChannelSums(*acc.sums(mean.numel(), "cpu"), mean, var)


def _in_place_norm(bn) -> native.InPlaceNorm | None:
    try:
        return native.InPlaceNorm(bn)
    except ValueError:  # float64 buffers, no affine parameters of the right kind: its own forward
        return None
