"""The statistics pass's instrumentation of each layer with running statistics.

On every call the layer (1) adds the input's per-channel moments to the layer's float64
accumulators (``batch_moments``: one ``torch.var_mean``) and (2) normalizes that call with the
batch's own statistics (``use_batch``; see :mod:`normsurgeon.calibrate.recalibrate`).
"""
from __future__ import annotations

from typing import Callable

import torch

from normsurgeon.calibrate.stats import PooledMoments


class Collection:
    """Instruments every layer for one statistics pass; ``close()`` restores them.

    The collector runs inside the layer's ``forward`` (an instance attribute wrapping the module's
    own, removed by ``close``), not as a forward pre-hook: a module with hooks takes torch's slower
    call path. A module that refuses attributes gets a pre-hook instead.
    """

    def __init__(self, layers, pooled: dict[str, PooledMoments]) -> None:
        self._undo: list[Callable[[], None]] = []
        try:
            for name, handle in layers:
                self._instrument(handle.module, _collector(handle, pooled[name]))
        except BaseException:
            self.close()
            raise

    def _instrument(self, module, collect: Callable[[object], None]) -> None:
        own = module.forward

        def forward(*args, **kwargs):
            if args:
                collect(args[0])
            return own(*args, **kwargs)

        previous = module.__dict__.get("forward")  # an instance-level forward someone set, kept as is
        try:
            object.__setattr__(module, "forward", forward)
        except (AttributeError, TypeError):
            hook = module.register_forward_pre_hook(lambda mod, args: collect(args[0]) if args else None)
            self._undo.append(hook.remove)
            return
        if previous is None:
            self._undo.append(lambda: module.__dict__.pop("forward", None))
        else:
            self._undo.append(lambda: object.__setattr__(module, "forward", previous))

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()


def _collector(handle, acc: PooledMoments) -> Callable[[object], None]:
    def collect(x) -> None:
        if not isinstance(x, torch.Tensor):
            return
        s, s2, n = handle.batch_moments(x)
        acc.add(s, s2, n)
        if n > 0:
            handle.use_batch(s / n, s2 / n, n)

    return collect
