"""``evaluate``: top-1 accuracy and cross-entropy loss on labelled data, optionally under simulated
weight noise (the same instance as ``recalibrate``'s fixed mode for the same seed and clean weights),
so users can see a model before and after recalibration on the same simulated chip.

The model runs in eval mode; with noise, weights are perturbed in place for the pass and restored
bit for bit afterwards (the caller's model ends exactly as it began). Under an initialized
``torch.distributed`` process group the batches are sharded and the counts all-reduced.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normsurgeon.calibrate.data import as_dataset
from normsurgeon.calibrate.distributed import all_reduce_sum, rank_world
from normsurgeon.calibrate.noise import WeightNoise, check_seed, fixed_stream, parse_noise
from normsurgeon.calibrate.plan import check_fits, make_plan, model_device_dtype, run_model
from normsurgeon.errors import DataError
from normsurgeon.report import Reported

DEFAULT_EVAL_BATCH = 256


class EvaluateResult(dict, Reported):
    """evaluate's figures: a dict (``result["accuracy"]``), with ``report`` and ``to_json()`` like every
    verb's result."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    noise: Any = None,
    noise_seed: int | None = None,
    batch_size: int = DEFAULT_EVAL_BATCH,
    samples: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: Callable[[int], None] | None = None,
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """``{"accuracy", "loss", "samples", "correct", "noise", "noise_seed", "data"}`` on ``data``.

    ``loss`` is the mean cross-entropy of the model's logits (computed in float64). ``noise``:
    ``"weight:ETA"``; ``noise_seed`` picks the instance. ``teacher``: also report ``agreement`` (the
    fraction of samples whose top-1 class equals the teacher's) and ``output_diff`` (mean over samples
    of the mean |logit - teacher logit|); the teacher runs clean, in eval mode.
    """
    spec = parse_noise(noise)
    noise_seed = check_seed(noise_seed, spec)
    dataset = as_dataset(data, image_size=image_size, mean=mean, std=std)
    if not dataset.has_labels:
        raise DataError(f"{dataset.name} has no labels y: evaluate needs one class index per sample")
    plan = make_plan(len(dataset), batch_size, samples=samples, shuffle=False, full_batches=False)
    check_fits(model, dataset)
    device, dtype = model_device_dtype(model)
    rank, world = rank_world()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = agree = 0
    loss_sum = diff_sum = 0.0
    t_modes = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        check_fits(teacher, dataset)
        teacher.eval()
    noisy = WeightNoise(model, spec) if spec is not None else None
    try:
        with torch.no_grad():
            if noisy is not None:
                noisy.apply(*fixed_stream(noise_seed))
            for b in plan.shard(rank, world):
                x, y = dataset.take(plan.indices(b))
                x, y = x.to(device=device, dtype=dtype), y.to(device)
                out = run_model(model, x)
                logits = _logits(out, x.shape[0])
                if int(y.max()) >= logits.shape[1]:
                    raise DataError(f"label {int(y.max())} in {dataset.name} is out of range for a model with "
                                    f"{logits.shape[1]} outputs")
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(F.cross_entropy(logits.double(), y, reduction="sum"))
                if teacher is not None:
                    t_logits = _logits(run_model(teacher, x), x.shape[0])
                    if t_logits.shape != logits.shape:
                        raise DataError(f"the teacher returns {tuple(t_logits.shape)} outputs, the model "
                                        f"{tuple(logits.shape)}: compare a model with its own teacher")
                    agree += int((logits.argmax(1) == t_logits.argmax(1)).sum())
                    diff_sum += float((logits.double() - t_logits.double()).abs().mean(1).sum())
                if progress is not None:
                    progress(int(x.shape[0]))
    finally:
        if noisy is not None:
            noisy.restore()
        for m, training in modes + t_modes:
            m.training = training
    totals = all_reduce_sum(torch.tensor([float(correct), loss_sum, float(agree), diff_sum], dtype=torch.float64))
    correct, loss_sum = int(round(float(totals[0]))), float(totals[1])
    n = plan.samples
    extra = {} if teacher is None else {"agreement": float(totals[2]) / n, "output_diff": float(totals[3]) / n}
    return EvaluateResult({**extra,
        "accuracy": correct / n, "loss": loss_sum / n, "samples": n, "correct": correct,
        "noise": None if spec is None else str(spec), "noise_seed": noise_seed if spec is not None else None,
        "data": dataset.name,
    })


def _logits(out, n: int) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"evaluate needs a classifier returning logits (N, classes); this model returns {shape}")
    return out
