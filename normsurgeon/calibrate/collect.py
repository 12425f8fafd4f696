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

from normsurgeon.calibrate.protocol import BatchNormStats
from normsurgeon.calibrate.stats import PooledMoments
from normsurgeon.native import moments as native


class Collection:
    """Instruments every layer for one statistics pass; ``close()`` restores them; ``calls`` counts
    the layer calls each way.

    The collector runs inside the layer's ``forward`` (an instance attribute wrapping the module's
    own, removed by ``close``), not as a forward pre-hook: a module with hooks takes torch's slow
    call path, which on the digits CNN cost a quarter to three quarters of the C kernel's own work.
    """

    def __init__(self, layers, pooled: dict[str, PooledMoments]) -> None:
        self.calls = {"native": 0, "torch": 0}
        self._undo: list[Callable[[], None]] = []
        try:
            for name, handle in layers:
                self._instrument(handle.module, self._collector(handle, pooled[name]))
        except BaseException:
            self.close()
            raise

    def _instrument(self, module, collect: Callable[[object], None]) -> None:
        previous = module.__dict__.get("forward")  # an instance-level forward someone set, kept as is
        own = module.forward

        def forward(*args, **kwargs):
            if args:
                collect(args[0])
            return own(*args, **kwargs)

        try:
            object.__setattr__(module, "forward", forward)
        except (AttributeError, TypeError):  # a module that refuses attributes: the slower hook
            hook = module.register_forward_pre_hook(lambda mod, args: collect(args[0]) if args else None)
            self._undo.append(hook.remove)
            return
        if previous is None:
            self._undo.append(lambda: module.__dict__.pop("forward", None))
        else:
            self._undo.append(lambda: object.__setattr__(module, "forward", previous))

    def _collector(self, handle, acc: PooledMoments) -> Callable[[object], None]:
        fast = _native_sums(handle, acc)

        def collect(x) -> None:
            if not isinstance(x, torch.Tensor):
                return
            if fast is not None:
                n = fast(x)
                if n:
                    acc.count_batch(n)
                    self.calls["native"] += 1
                    return
            self.calls["torch"] += 1
            s, s2, n = handle.batch_moments(x)
            acc.add(s, s2, n)
            if n > 0:
                handle.use_batch(s / n, s2 / n, n)

        return collect

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def describe(self) -> str:
        """Which kernel computed the statistics, for the report."""
        native_calls, torch_calls = self.calls["native"], self.calls["torch"]
        if torch_calls == 0:
            return "native (one-pass C kernel)" if native_calls else "none"
        why = native.why_not() or "the C kernel takes only torch BN with contiguous CPU float32 inputs"
        text = f"torch reductions ({why})"
        total = native_calls + torch_calls
        return text if native_calls == 0 else f"native for {native_calls} of {total} layer calls, else {text}"


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
