"""Data parallelism for ``recalibrate`` and ``evaluate`` under ``torchrun``.

``torchrun --nproc-per-node N -m normsurgeon recalibrate ...`` starts N processes with RANK and
WORLD_SIZE set. :func:`process_group` joins them (gloo on CPU, nccl when CUDA is used), each rank
runs the batches ``b % N == rank`` of the same plan (see :mod:`normsurgeon.calibrate.plan`), and the
float64 sums and counts are all-reduced once at the end: exact pooling, not averaged averages.
Rank 0 alone writes the output and prints the report.

The API functions use whatever process group the caller has initialized (``torch.distributed``);
without one they run single-process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


def launched() -> bool:
    """True in a process started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


@contextmanager
def process_group(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """Join the launcher's process group (if launched and not yet joined); yields (rank, world)."""
    import torch.distributed as dist

    created = False
    if launched() and dist.is_available() and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("NS_DIST_BACKEND") == "nccl" else "gloo"
        dist.init_process_group(backend)
        created = True
    try:
        yield rank_world()
    finally:
        if created:
            dist.destroy_process_group()


def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over all ranks (identity without a process group)."""
    import torch.distributed as dist

    if rank_world()[1] == 1:
        return flat
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = flat.to(device=device, dtype=torch.float64).contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()
