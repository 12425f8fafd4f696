"""Checkpoints of a distillation run: written atomically beside the output, resumed exactly.

A checkpoint holds everything the next step depends on: the student's tensors, the optimizer's
state (AdamW moments and step counts), the torch RNG state, the step reached, and the run's settings.
The learning rate is a pure function of the step and the batches are a pure function of the seed
and the step (see :mod:`normsurgeon.distillation.loop`), so a run resumed from step k takes exactly the
steps an uninterrupted run takes. Files are plain tensors and containers, loaded weights-only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from normsurgeon.errors import DistillError, first_line

FORMAT = "normsurgeon-distill-checkpoint"
VERSION = 1
SUFFIX = ".ckpt"
# settings that must match for a resumed run to be the same run
MUST_MATCH = ("steps", "batch_size", "lr", "weight_decay", "warmup", "seed", "loss", "temperature", "data",
              "samples", "mixup", "feature_weight")
ADDED_LATER = {"feature_weight": 0.0}  # settings older checkpoints lack, with the value those runs used


def path_for(output: str | os.PathLike) -> Path:
    """Where the checkpoints of a run writing ``output`` go: ``OUTPUT.ckpt``."""
    out = Path(output)
    return out.with_name(out.name + SUFFIX)


def save(path: Path, *, step: int, config: dict, student: torch.nn.Module, optimizer, record: dict) -> None:
    from normsurgeon.publish import publish

    payload = {
        "format": FORMAT, "version": VERSION, "step": int(step), "config": dict(config),
        "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "record": record,
    }
    publish(Path(path), lambda tmp: torch.save(payload, tmp), force=True)  # replaces the previous checkpoint


def load(path: Path, config: dict) -> dict[str, Any]:
    """The checkpoint at ``path``, checked against this run's ``config``."""
    if not Path(path).is_file():
        raise DistillError(f"no checkpoint to resume at {path}; run without --resume to start afresh")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file
        raise DistillError(f"cannot read checkpoint {path} ({first_line(e)}); delete it and run without --resume") \
            from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or not isinstance(ck.get("config"), dict):
        raise DistillError(f"{path} is not a distill checkpoint; delete it and run without --resume")
    saved = {**ADDED_LATER, **ck["config"]}
    diff = [k for k in MUST_MATCH if saved.get(k) != config.get(k)]
    if diff:
        k = diff[0]
        raise DistillError(f"checkpoint {path} was made with {k}={saved.get(k)!r}, this run has {config.get(k)!r}; "
                           "resume with the same settings, or delete the checkpoint to start afresh")
    return ck


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
