"""Stage 2, end-to-end output matching: AdamW on the distillation loss, linear warm-up then cosine
decay to zero, the student in eval mode (its norms are batch-independent, so eval and train forward
agree, dropout stays off, and a batch's loss is the mean of per-sample losses).

Determinism, which resume and data parallelism rely on:

- batch ``s`` is a pure function of (seed, s): epoch ``e = s // (N // B)`` uses the permutation
  ``randperm(N)`` seeded with ``seed * 1_000_003 + e`` and takes its ``s % (N // B)``-th slice of B
  samples (a remainder smaller than B is left out of that epoch);
- the learning rate is a pure function of s, and so is the input mixup of batch s (:func:`mix`);
- under ``torch.distributed`` (DDP, gloo on CPU, nccl on CUDA) rank r of W takes the r-th of W equal
  parts of the same global batch; DDP averages the gradients, which equals the gradient of the mean
  over the whole batch, so W processes take the steps one process takes.

The teacher runs under ``no_grad`` and never changes. Checkpoints go to ``checkpoint`` every
``checkpoint_every`` steps (rank 0 writes). Ctrl-C (SIGINT) finishes the current step, writes a
checkpoint and raises :class:`~normsurgeon.errors.InterruptedRun`. A NaN/Inf loss stops before the
step is taken, keeping the last checkpoint, with a :class:`~normsurgeon.errors.DistillError`.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from normsurgeon.calibrate.distributed import rank_world
from normsurgeon.distillation import checkpoint as ckpt
from normsurgeon.distillation import outputs
from normsurgeon.distillation.features import FeatureTaps
from normsurgeon.errors import DistillError, InterruptedRun

SEED_STRIDE = 1_000_003
MIX_OFFSET = 500_000_017  # mixing draws use other seeds than the data order


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int
    seed: int
    loss: str
    temperature: float
    checkpoint: Path | None = None
    checkpoint_every: int = 100
    mixup: bool = True
    features: float = 0.0  # weight of the layer-wise term (features.py); 0 = outputs only


def mix(x: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """Input mixup for a global batch (any per-sample shape): sample i becomes
    ``lam_i * x_i + (1 - lam_i) * x_perm(i)`` with ``lam_i ~ U(0, 1)`` and a random pairing, both a pure
    function of (seed, step). Teacher and student see the same mixed inputs, so the student learns the
    teacher's function between the data points too, not only on them (no labels are involved)."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + step + MIX_OFFSET)
    n = x.shape[0]
    lam = torch.rand(n, generator=g, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
    perm = torch.randperm(n, generator=g).to(x.device)
    lam = lam.view(n, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[perm]


def lr_at(step: int, cfg: LoopConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup) / span))


class BatchOrder:
    """The global batch of each step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch:(i + 1) * self.batch]


class _StopFlag:
    """SIGINT sets a flag checked between steps (never stops inside an optimizer step)."""

    def __init__(self) -> None:
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def make_optimizer(student: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise DistillError("the student has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def _global_mean(value: torch.Tensor, world: int) -> float:
    if world == 1:
        return float(value.detach())
    import torch.distributed as dist

    t = value.detach().double().reshape(1).to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t) / world


def train(student: nn.Module, teacher: nn.Module, dataset, cfg: LoopConfig, device, dtype, *,
          optimizer: torch.optim.Optimizer, start_step: int, config: dict, record: dict,
          progress: Callable[[int, float], None] | None = None) -> dict:
    """Run steps ``start_step .. cfg.steps - 1``; returns the first and last training loss seen."""
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise DistillError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes: "
                           "use a multiple of the process count")
    local = cfg.batch_size // world
    order = BatchOrder(len(dataset), cfg.batch_size, cfg.seed)
    model = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    student.eval()
    first = last = None
    start = time.perf_counter()
    step = start_step
    taps = FeatureTaps(student, teacher) if cfg.features > 0 else None
    with _StopFlag() as stop, taps if taps is not None else contextlib.nullcontext():
        while step < cfg.steps:
            if stop.set:
                _write(cfg, rank, step, config, student, optimizer, record)
                where = f"; checkpoint written to {cfg.checkpoint}, rerun with --resume to continue" \
                    if cfg.checkpoint else ""
                raise InterruptedRun(f"interrupted at step {step} of {cfg.steps}{where}")
            if cfg.mixup:  # mix the global batch, then take this rank's part
                x = mix(dataset.take(order.indices(step))[0], step, cfg.seed)[rank * local:(rank + 1) * local]
            else:
                x = dataset.take(order.indices(step)[rank * local:(rank + 1) * local])[0]
            x = x.to(device=device, dtype=dtype)
            with torch.no_grad():
                t_out = teacher(x)
            loss = outputs.loss(model(x), t_out, cfg.loss, cfg.temperature)
            layer_term = taps.loss() if taps is not None else None
            if layer_term is not None:
                loss = loss + cfg.features * layer_term
            value = _global_mean(loss, world)
            if not math.isfinite(value):
                kept = f"; the last good checkpoint (step {_ckpt_step(cfg)}) is kept at {cfg.checkpoint}" \
                    if cfg.checkpoint and cfg.checkpoint.exists() else ""
                raise DistillError(f"the distillation loss became {value} at step {step}{kept}; "
                                   "lower --lr (now {:g}) and rerun".format(cfg.lr))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            first = value if first is None else first
            last = value
            if progress is not None:
                progress(step, value)
            if cfg.checkpoint is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _write(cfg, rank, step, config, student, optimizer, record)
    return {"loss_first_step": first, "loss_last_step": last, "seconds": time.perf_counter() - start,
            "steps_run": step - start_step, "layers_matched": len(taps.names) if taps is not None else 0}


def _ckpt_step(cfg: LoopConfig):
    try:
        return int(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _write(cfg: LoopConfig, rank: int, step: int, config: dict, student, optimizer, record) -> None:
    if cfg.checkpoint is None:
        return
    if rank == 0:
        ckpt.save(cfg.checkpoint, step=step, config=config, student=student, optimizer=optimizer, record=record)
    if rank_world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
