"""``distill``: give a converted (or any batch-independent) student the function of its BN teacher.

Label-free: only the inputs of DATA are used; labels, where present, only for reporting accuracy.
Stages, each reported with the distillation loss and top-1 agreement on a fixed evaluation set
(the first 2048 samples of DATA) before and after it:

1. ``moment-init`` (one forward pass, :mod:`normsurgeon.distillation.moment_init`): each replaced norm's
   affine is set so that its per-channel output mean and std over one batch of DATA equal the
   teacher's BN output there.
2. ``output-matching`` (:mod:`normsurgeon.distillation.loop`): AdamW on KL(teacher || student) of the
   logits (MSE for outputs that are not (N, classes) logits), warm-up then cosine decay.

The student keeps its architecture; only its parameters change, and the input model is not modified
(the pass works on a copy). The teacher is used on a copy, in eval mode, without gradients.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from normsurgeon import provenance
from normsurgeon.calibrate.data import Dataset, TensorData, as_dataset
from normsurgeon.calibrate.distributed import rank_world
from normsurgeon.calibrate.plan import check_fits
from normsurgeon.distillation import checkpoint as ckpt
from normsurgeon.distillation import inversion, measure, outputs
from normsurgeon.distillation.loop import LoopConfig, make_optimizer, train
from normsurgeon.distillation.moment_init import moment_init
from normsurgeon.errors import DataError, DistillError, first_line

DEFAULTS = {"steps": 1000, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.0, "seed": 0, "loss": "auto",
            "temperature": 1.0, "feature_weight": 0.0}
INIT_SAMPLES = 512


@dataclass
class DistillResult:
    model: nn.Module
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text (``report`` is the JSON-ready dict)."""
        import json

        return json.dumps(self.report, indent=indent, default=str)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        from normsurgeon.errors import DependencyError

        raise DependencyError("--device cuda: no CUDA device is available here; use --device cpu")
    if d.type == "cuda" and d.index is None and rank_world()[1] > 1:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int | None = None,
    seed: int = DEFAULTS["seed"],
    loss: str = DEFAULTS["loss"],
    temperature: float = DEFAULTS["temperature"],
    feature_weight: float = DEFAULTS["feature_weight"],
    init: bool = True,
    mixup: bool = True,
    input_shape: Any = None,
    device: str | torch.device | None = "cpu",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
    inversion_options: dict | None = None,
) -> DistillResult:
    """Distill ``teacher`` into a copy of ``student`` on the inputs of ``data``; see the module docstring.

    ``data``: a DATA spec (``digits:train``, a .npz/.pt file, an image folder), ``inversion:N`` (N
    inputs synthesized from the teacher's BN statistics, shape from ``input_shape`` or the model's
    config), a tensor ``x``, ``(x, y)`` or a Dataset. ``steps`` optimizer steps of ``batch_size``
    samples (the global batch under torch.distributed). ``init``: run the moment-init stage.
    ``checkpoint``: a file to write every ``checkpoint_every`` steps and to continue from with
    ``resume``. ``progress(step, loss)`` is called after every step.
    """
    _check_settings(steps, batch_size, lr, temperature, checkpoint_every)
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) \
            or not math.isfinite(feature_weight) or feature_weight < 0:
        raise DistillError(f"bad --feature-weight {feature_weight!r}: use a number >= 0 (0 matches outputs only)")
    outputs.check_loss(loss)
    dev = resolve_device(device)
    world = rank_world()[1]
    t_model = copy.deepcopy(teacher).to(dev).eval().requires_grad_(False)
    new = copy.deepcopy(student).to(dev).eval()
    dtype = torch.float32 if not any(p.is_floating_point() for p in new.parameters()) else \
        next(p.dtype for p in new.parameters() if p.is_floating_point())
    t_model = t_model.to(dtype=dtype)

    started = time.perf_counter()
    n_inv = inversion.parse(data)
    inv_report = None
    if n_inv is not None:
        shape = inversion.sample_shape(t_model, input_shape)
        opts = dict(inversion_options or {})
        if inversion.parse_full(data)[1] is not None:
            opts["clamp"] = inversion.parse_full(data)[1]
        hist: list = []
        t0 = time.perf_counter()
        x = inversion.synthesize(t_model, n_inv, shape, seed=seed, device=dev, dtype=dtype, history=hist, **opts)
        dataset: Dataset = TensorData(x, None, name=f"inversion:{n_inv}")
        inv_report = {"samples": n_inv, "shape": list(shape), "seconds": round(time.perf_counter() - t0, 3),
                      "bn_loss_start": sum(a for a, _ in hist) / len(hist),
                      "bn_loss_end": sum(b for _, b in hist) / len(hist)}
    else:
        dataset = as_dataset(data)
    if len(dataset) < batch_size:
        raise DataError(f"{dataset.name} holds {len(dataset)} samples, fewer than one batch of {batch_size}: "
                        "lower --batch-size or give more data")
    check_fits(t_model, dataset)
    check_fits(new, dataset)
    probe = dataset.take(torch.arange(min(2, len(dataset))))[0].to(device=dev, dtype=dtype)
    with torch.no_grad():
        outputs.check_compatible(new(probe), t_model(probe))

    cfg = LoopConfig(steps=steps, batch_size=batch_size, lr=float(lr), weight_decay=float(weight_decay),
                     warmup=_warmup(warmup, steps), seed=int(seed), loss=loss, temperature=float(temperature),
                     checkpoint=Path(checkpoint) if checkpoint is not None else None,
                     checkpoint_every=int(checkpoint_every), mixup=bool(mixup), features=float(feature_weight))
    config = {"steps": steps, "batch_size": batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
              "warmup": cfg.warmup, "seed": cfg.seed, "loss": loss, "temperature": cfg.temperature,
              "data": dataset.name, "samples": len(dataset), "init": bool(init),
              "mixup": bool(mixup), "feature_weight": cfg.features}
    if cfg.checkpoint is not None and not resume and cfg.checkpoint.exists():
        raise DistillError(f"a checkpoint of an earlier run exists at {cfg.checkpoint}: pass --resume to continue "
                           "it, or delete it to start afresh")
    ev = measure.eval_indices(len(dataset))

    def gauge():
        return measure.measure(new, t_model, dataset, ev, dev, dtype, loss, cfg.temperature)

    optimizer = make_optimizer(new, cfg)
    start_step = 0
    if resume:
        if cfg.checkpoint is None:
            raise DistillError("resume needs a checkpoint path")
        state = ckpt.load(cfg.checkpoint, config)
        try:
            new.load_state_dict(state["student"])
        except RuntimeError as e:
            raise DistillError(f"checkpoint {cfg.checkpoint} does not fit this student ({first_line(e)}); "
                               "delete it to start afresh") from None
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_step, record = int(state["step"]), state["record"]
    else:
        before = gauge()
        record = {"stages": [], "before": before, "loop_start": before}
    if init and not resume:
        t0 = time.perf_counter()
        xs = dataset.take(torch.arange(min(INIT_SAMPLES, len(dataset))))[0].to(device=dev, dtype=dtype)
        fitted = moment_init(new, t_model, xs)
        after = gauge()
        record["stages"].append(_stage("moment-init", before, after, time.perf_counter() - t0, layers=len(fitted)))
        record["loop_start"] = after
    summary = train(new, t_model, dataset, cfg, dev, dtype, optimizer=optimizer, start_step=start_step,
                    config=config, record=record, progress=progress)
    final = gauge()
    before, stages = record["before"], list(record["stages"])
    stages.append(_stage("output-matching", record["loop_start"], final, summary["seconds"], steps=steps,
                         train_loss_first_step=summary["loss_first_step"],
                         train_loss_last_step=summary["loss_last_step"], feature_weight=cfg.features,
                         layers_matched=summary["layers_matched"]))
    new.eval()
    if any(p.grad is not None for p in t_model.parameters()):
        raise AssertionError("the teacher received gradients; report this as a bug")
    provenance.record(new, student, "distill", {
        "replay": False, "teacher": (provenance.get(teacher) or {}).get("source"), "data": dataset.name,
        "steps": steps, "batch_size": batch_size, "lr": cfg.lr, "seed": cfg.seed, "loss": loss,
        "temperature": cfg.temperature, "init": bool(init),
        "mixup": bool(mixup), "feature_weight": cfg.features,
    })
    report = {
        "steps": steps, "resumed_from_step": start_step if resume else None, "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(summary["seconds"], 3), "batch_size": batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "loss": loss, "temperature": cfg.temperature, "mixup": bool(mixup), "feature_weight": cfg.features,
        "world_size": world, "device": str(dev), "data": dataset.name, "samples": len(dataset),
        "eval_samples": len(ev), "labels": dataset.has_labels, "inversion": inv_report,
        "stages": stages, "before": _public(before), "after": _public(final),
        "teacher_accuracy": final["teacher_accuracy"],
    }
    return DistillResult(model=new.cpu() if dev.type != "cpu" else new, report=report)


def _public(m: dict) -> dict:
    return {"loss": m["loss"], "agreement": m["agreement"], "output_diff": m["output_diff"], "accuracy": m["accuracy"]}


def _stage(name: str, a: dict, b: dict, seconds: float, **extra) -> dict:
    d = {"name": name, "loss_start": a["loss"], "loss_end": b["loss"], "agreement_start": a["agreement"],
         "agreement_end": b["agreement"], "accuracy_start": a["accuracy"], "accuracy_end": b["accuracy"],
         "seconds": round(seconds, 3)}
    d.update(extra)
    return d


def _warmup(warmup: int | None, steps: int) -> int:
    return max(1, round(0.05 * steps)) if warmup is None else max(1, int(warmup))


def _check_settings(steps, batch_size, lr, temperature, every) -> None:
    for name, v in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DistillError(f"bad {name} {v!r}: use an integer >= 1")
    for name, v, example in (("--lr", lr, "1e-3"), ("--temperature", temperature, "8")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise DistillError(f"bad {name} {v!r}: use a positive number, e.g. {example}")
