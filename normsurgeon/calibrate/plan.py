"""Which samples go in which batch, on which rank; and whether the data fits the model.

Calibration is counted in samples (nncf#298: a batch count is the wrong unit). A plan takes the
first ``samples`` samples of a fixed order (a permutation seeded with 0 when ``shuffle``, so batches
mix classes even for an ImageFolder sorted by class), cuts them into batches of ``batch_size`` and
lets a remainder smaller than one batch join the last batch (no tiny batch whose statistics would be
degenerate; every sample is seen). Under data parallelism batch ``b`` runs on rank ``b % world``:
since each batch is normalized with its own statistics, a batch's activations do not depend on the
rank that computes it, and the pooled sums equal a single-process run's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normsurgeon.calibrate.data import Dataset
from normsurgeon.errors import DataError, first_line

SHUFFLE_SEED = 0


@dataclass(frozen=True)
class BatchPlan:
    order: torch.Tensor  # sample indices, in the order they are used
    bounds: tuple[tuple[int, int], ...]  # (start, stop) into ``order`` per batch

    @property
    def samples(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    def __len__(self) -> int:
        return len(self.bounds)

    def indices(self, b: int) -> torch.Tensor:
        start, stop = self.bounds[b]
        return self.order[start:stop]

    def shard(self, rank: int, world: int) -> list[int]:
        return list(range(rank, len(self.bounds), world))

    def samples_of(self, batch_ids: list[int]) -> int:
        return sum(self.bounds[b][1] - self.bounds[b][0] for b in batch_ids)


def make_plan(n: int, batch_size: int, *, batches: int | None = None, samples: int | None = None,
              shuffle: bool = True, full_batches: bool = True) -> BatchPlan:
    """Batches over ``n`` samples. ``full_batches`` (recalibration): refuse data smaller than one
    batch and merge a remainder into the last batch; otherwise (evaluation) keep a short last batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"bad batch size {batch_size!r}: use an integer >= 1")
    if batches is not None and batches < 1:
        raise DataError(f"bad --batches {batches}: use an integer >= 1 (or omit it to use all data)")
    if samples is not None and samples < 1:
        raise DataError(f"bad --samples {samples}: use an integer >= 1 (or omit it to use all data)")
    use = n if samples is None else min(n, samples)
    if batches is not None:
        use = min(use, batches * batch_size)
    if use == 0:
        raise DataError("the data holds no samples")
    if full_batches and use < batch_size:
        raise DataError(f"only {use} samples, fewer than one batch of {batch_size}: lower --batch-size "
                        "or give more data (batch statistics need full batches)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SHUFFLE_SEED)) if shuffle \
        else torch.arange(n)
    order = order[:use]
    starts = list(range(0, use, batch_size))
    bounds = [(s, min(s + batch_size, use)) for s in starts]
    if full_batches and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < batch_size:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return BatchPlan(order, tuple(bounds))


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


PROBE_SAMPLES = 2


def check_fits(model: nn.Module, data: Dataset) -> None:
    """Refuse data the model cannot run on, by running it on the first samples (no_grad, eval mode,
    modes restored after): the model decides which per-sample shapes it takes ((C, H, W), (L,), (C, L), (F,),
    (C, D, H, W), or a flat vector it reshapes itself), not a guess from its first layer."""
    device, dtype = model_device_dtype(model)
    x = data.take(torch.arange(min(PROBE_SAMPLES, len(data))))[0].to(device=device, dtype=dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, x)
    finally:
        for m, training in modes:
            m.training = training


def _caused_by_resources(e: BaseException) -> bool:
    """Out of memory and friends: not the data's fault, so never reported as a data error."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


def run_model(model: nn.Module, x: torch.Tensor):
    """``model(x)``, turning an error the data caused (a shape, dtype or index error raised while
    running on it) into one DataError line; anything else (out of memory, ...) propagates."""
    try:
        return model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        if _caused_by_resources(e):
            raise
        raise DataError(f"the model cannot run on data batches of shape {tuple(x.shape)}: {first_line(e)}") from None
