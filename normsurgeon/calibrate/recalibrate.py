"""``recalibrate``: re-estimate running statistics on data, optionally under simulated weight noise.

What changes: only the running statistics of layers that keep them (torch BN via an adapter, and any
module with the recalibration protocol: normsurgeon's bcn, bgn, ghost, ebn, input-norm layers).
Parameters, every other buffer and every other module are untouched; the model stays in eval mode,
so dropout is off. The input model is never modified (the pass works on a deep copy).

How the pass runs (one eval-mode forward per batch, the cost of inference):

- A collector run inside each such layer's forward (:mod:`normsurgeon.calibrate.collect`) takes its
  input's per-channel mean and variance (``batch_moments(x)``: one ``torch.var_mean``) and adds them
  to float64 accumulators (:mod:`normsurgeon.calibrate.stats`): exact cumulative averaging over all
  data seen, not momentum, not averaged per-batch variances.
- The layer then normalizes that batch with the batch's own statistics (loaded for the one call),
  like BN in training mode: downstream layers see activations normalized the way a freshly
  calibrated network would normalize them, whatever the stale statistics were. (torch's
  ``update_bn`` does the same with the *whole model* in train mode, dropout included; pooling
  exactly and keeping dropout off are the differences.) A consequence: results depend on the batch
  size (not on the number of processes); use batches of at least 16-32 samples.
- At the end each layer receives the pooled ``E[x]``, ``E[x^2]`` and count (``load_moments``).

Noise-aware mode (Tsai et al., arXiv 2007.03230; noise model in :mod:`normsurgeon.calibrate.noise`):

- ``noise_mode="fixed"``: one noise instance (``noise_seed``) stays on the weights for the whole
  pass: the statistics of *that* chip (chip-in-the-loop). ``evaluate(noise=..., noise_seed=S)``
  applies the same instance.
- ``noise_mode="resample"``: every batch runs under ``noise_samples`` fresh instances (K forward
  passes per batch); E[x] and E[x^2] are pooled across all draws, so the variance includes the
  spread the noise causes between chips: one set of statistics for any chip.

The saved model holds the clean weights: noise is only simulated during the pass and restored bit
for bit afterwards.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from normsurgeon import provenance
from normsurgeon.calibrate.collect import Collection
from normsurgeon.calibrate.data import as_dataset
from normsurgeon.calibrate.distributed import all_reduce_sum, rank_world
from normsurgeon.calibrate.noise import WeightNoise, fixed_stream, resample_stream, resolve_noise
from normsurgeon.calibrate.plan import check_fits, make_plan, model_device_dtype, run_model
from normsurgeon.calibrate.protocol import find_stat_layers
from normsurgeon.calibrate.stats import PooledMoments
from normsurgeon.errors import DataError, VerificationError, NothingToRecalibrateError
from normsurgeon.graph.verify import compare
from normsurgeon.report import Change, SurgeryResult, Verification

DEFAULT_BATCH_SIZE = 32
STAT_BUFFERS = ("running_mean", "running_var", "running_sq_mean", "num_batches_tracked")


def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    batches: int | None = None,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    noise: Any = None,
    noise_mode: str = "fixed",
    noise_seed: int | None = None,
    noise_samples: int = 1,
    shuffle: bool = True,
    verify: bool = False,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SurgeryResult:
    """Re-estimate running statistics of ``model`` (a copy) on ``data``; see the module docstring.

    ``data``: a DATA spec (``digits:train``, a .npz/.pt file, an image folder; ``image_size``/
    ``mean``/``std`` apply to folders), a tensor ``x``, ``(x, y)``, or a
    :class:`~normsurgeon.calibrate.data.Dataset`. ``samples``/``batches``: use at most that many
    samples / batches (default: all data). ``noise``: ``"weight:ETA"``. ``progress(n)`` is called
    after each batch with its sample count. ``verify``: raise if anything but running statistics
    changed. Under an initialized ``torch.distributed`` process group the batches are sharded across
    ranks and the sums all-reduced; every rank returns the same model.
    """
    spec, noise_seed, draws = resolve_noise(noise, noise_mode, noise_seed, noise_samples)

    dataset = as_dataset(data, image_size=image_size, mean=mean, std=std)
    plan = make_plan(len(dataset), batch_size, batches=batches, samples=samples, shuffle=shuffle)
    new = copy.deepcopy(model).eval()
    check_fits(new, dataset)
    layers, skipped = find_stat_layers(new)
    if not layers:
        raise NothingToRecalibrateError(
            "the model has no layer with running statistics (BatchNorm or a normsurgeon layer with running "
            "estimates): nothing to recalibrate")
    before = {name: h.stats() for name, h in layers}
    device, dtype = model_device_dtype(new)
    rank, world = rank_world()
    mine = plan.shard(rank, world)

    pooled = {name: PooledMoments() for name, _ in layers}
    collection = Collection(layers, pooled)
    noisy = WeightNoise(new, spec) if spec is not None else None
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if noisy is not None and noise_mode == "fixed":
                noisy.apply(*fixed_stream(noise_seed))
            for b in mine:
                x = dataset.take(plan.indices(b))[0].to(device=device, dtype=dtype)
                for k in range(draws):
                    if noisy is not None and noise_mode == "resample":
                        noisy.apply(*resample_stream(noise_seed, b, k))
                    run_model(new, x)
                if progress is not None:
                    progress(int(x.shape[0]))
    finally:
        collection.close()
        if noisy is not None:
            noisy.restore()
    seconds = time.perf_counter() - start

    if world > 1:
        pooled = _all_reduce(pooled, layers)
    changes = list(skipped)
    noise_text = "" if spec is None else f"; under noise {spec} ({noise_mode}" + (
        f", seed {noise_seed})" if noise_mode == "fixed" else f", {draws} draw(s) per batch, seed {noise_seed})")
    bad = _first_non_finite(pooled)
    if bad is not None:
        raise DataError(f"statistics of {bad} are not finite: the model produces NaN/Inf on this data"
                        + (" under this noise" if spec is not None else ""))
    with torch.no_grad():
        for name, h in layers:
            p = pooled[name]
            if p.count == 0:
                changes.append(Change(name, "skipped", _describe_stats(*before[name]),
                                      detail="not reached by the forward pass: statistics left as they were"))
                continue
            mean64, sq64 = p.mean(), p.sq_mean()
            h.reset_running_stats()
            h.load_moments(mean64, sq64, p.count)
            h.set_calls(p.calls)
            changes.append(Change(name, "recalibrated", _describe_stats(*before[name]), _describe_stats(*h.stats()),
                                  detail=f"{p.count} values per statistic from {plan.samples} samples{noise_text}"))

    verification = None
    if verify:
        _check_only_stats(model, new, [name for name, _ in layers])
        verification = _output_change(model, new, dataset.take(plan.indices(0))[0].to(device=device, dtype=dtype))
    forwards = plan.samples * draws
    info = {
        "data": dataset.name, "samples": plan.samples, "batches": len(plan), "batch_size": batch_size,
        "forward_samples": forwards, "recalibrated": sum(1 for c in changes if c.action == "recalibrated"),
        "world_size": world, "seconds": round(seconds, 4),
        "samples_per_s": round(plan.samples_of(mine) * draws / seconds, 1) if seconds > 0 else None,
        "noise": None if spec is None else str(spec), "noise_mode": noise_mode if spec is not None else None,
        "noise_seed": noise_seed if spec is not None else None, "noise_samples": draws if spec is not None else None,
        "running_var": "torch BN: unbiased pooled variance n/(n-1)*(E[x^2]-E[x]^2); recipe layers: their own convention",
    }
    provenance.record(new, model, "recalibrate", {
        "replay": False, "data": dataset.name, "batch_size": batch_size, "batches": batches, "samples": samples,
        "noise": None if spec is None else str(spec), "noise_mode": noise_mode, "noise_seed": noise_seed,
        "noise_samples": noise_samples, "shuffle": shuffle,
    })
    return SurgeryResult(model=new, changes=changes, verb="recalibrate", path="statistics pass",
                         verification=verification, info=info)


def _all_reduce(pooled: dict[str, PooledMoments], layers) -> dict[str, PooledMoments]:
    shapes, parts = {}, []
    for name, h in layers:
        p = pooled[name]
        shape = tuple(p.sum_x.shape) if p.sum_x is not None else tuple(h.stats()[0].shape)
        shapes[name] = shape
        parts.append(p.pack(int(torch.Size(shape).numel())))
    flat = all_reduce_sum(torch.cat(parts))
    out, offset = {}, 0
    for (name, _), part in zip(layers, parts):
        out[name] = PooledMoments.unpack(flat[offset:offset + part.numel()], shapes[name])
        offset += part.numel()
    return out


def _first_non_finite(pooled: dict[str, PooledMoments]) -> str | None:
    """The first layer whose pooled sums hold NaN/Inf (one check over all layers in the common case)."""
    seen = [(name, p) for name, p in pooled.items() if p.count > 0]
    if not seen or torch.isfinite(torch.cat([torch.cat([p.sum_x.reshape(-1), p.sum_x2.reshape(-1)])
                                             for _, p in seen])).all():
        return None
    return next(name for name, p in seen if not (torch.isfinite(p.sum_x).all() and torch.isfinite(p.sum_x2).all()))


def _output_change(old: nn.Module, new: nn.Module, x: torch.Tensor) -> Verification:
    """How much recalibration moved the outputs on the first batch (informative: it is meant to)."""
    with torch.no_grad():
        v = compare(old, new, x, tolerance=None)
    v.note = ("outputs on the first batch before vs after; recalibration changes them by design. "
              "Checked: nothing but running statistics changed")
    return v


def _describe_stats(mean: torch.Tensor, second: torch.Tensor) -> str:
    if mean.numel() == 0:
        return "-"
    return f"mean {float(mean.double().mean()):.3g}, var {float(second.double().mean()):.3g} (channel avg)"


def _check_only_stats(old: nn.Module, new: nn.Module, layer_names: list[str]) -> None:
    allowed = {f"{n}.{b}" if n else b for n in layer_names for b in STAT_BUFFERS}
    a, b = old.state_dict(), new.state_dict()
    if a.keys() != b.keys():
        raise VerificationError("recalibration changed the model's state_dict keys; report this as a bug")
    for k, v in a.items():
        if k not in allowed and not torch.equal(v, b[k]):
            raise VerificationError(f"recalibration changed {k}, which is not a running statistic; report this as a bug")
