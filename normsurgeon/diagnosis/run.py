"""``diagnose``: one pass over data that measures, per norm layer, where normalization helps or hurts.

For every norm layer (see :mod:`normsurgeon.diagnosis.sites`) the pass pools exact float64 statistics
(:mod:`normsurgeon.diagnosis.collect`) with the model in eval mode, i.e. as it runs in deployment,
optionally under simulated weight noise (the noise model and flags of ``recalibrate``). The measures
(:mod:`normsurgeon.diagnosis.measures`) and the one-word verdicts (:mod:`normsurgeon.diagnosis.verdicts`)
are computed at the end. With a teacher, the teacher runs on the same batches (without noise) and
each layer's block output is compared with the matching teacher layer's (same name, else the same
position among the norm layers).

The model is not modified (the pass runs on a deep copy; noise is put on and taken off that copy).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from normsurgeon.calibrate.data import as_dataset
from normsurgeon.calibrate.noise import WeightNoise, fixed_stream, resample_stream, resolve_noise
from normsurgeon.calibrate.plan import check_fits, make_plan, model_device_dtype, run_model
from normsurgeon.calibrate.protocol import find_stat_layers
from normsurgeon.diagnosis import measures as M
from normsurgeon.diagnosis.collect import Hooks, SiteStats
from normsurgeon.diagnosis.sites import find_sites
from normsurgeon.diagnosis.verdicts import VERDICTS, thresholds, verdict
from normsurgeon.errors import DataError, NoNormLayersError

DEFAULT_BATCH_SIZE = 64


@dataclass
class DiagnoseResult:
    """``layers``: one dict per norm layer (in forward order); ``info``: what ran; ``report`` is the
    whole thing as one JSON-ready dict."""

    layers: list[dict]
    info: dict = field(default_factory=dict)

    @property
    def report(self) -> dict:
        counts = {v: sum(1 for r in self.layers if r["verdict"] == v) for v in VERDICTS}
        return {**self.info, "thresholds": thresholds(), "summary": {k: n for k, n in counts.items() if n},
                "layers": self.layers}

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.report, indent=indent, default=str)

    def flagged(self, word: str) -> list[str]:
        return [r["name"] for r in self.layers if r["verdict"] == word]


def diagnose(
    model: nn.Module,
    data: Any,
    teacher: nn.Module | None = None,
    *,
    samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    noise: Any = None,
    noise_mode: str = "fixed",
    noise_seed: int | None = None,
    noise_samples: int = 1,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DiagnoseResult:
    """Measure every norm layer of ``model`` on ``data`` (see the module docstring).

    ``data``: a DATA spec, a tensor ``x``, ``(x, y)`` or a Dataset, as for ``recalibrate``.
    ``samples``: use the first N samples (default all). ``teacher``: a model to compare features with
    (e.g. the model before ``convert``). ``noise`` etc.: simulated weight noise on ``model`` during
    the pass (``"weight:ETA"``; fixed: one instance ``noise_seed``; resample: ``noise_samples`` fresh
    draws per batch, pooled). ``progress(n)`` is called after each batch with its sample count.
    """
    spec, seed, draws = resolve_noise(noise, noise_mode, noise_seed, noise_samples)
    dataset = as_dataset(data, image_size=image_size, mean=mean, std=std)
    plan = make_plan(len(dataset), batch_size, samples=samples, shuffle=False, full_batches=False)
    student = copy.deepcopy(model).eval()
    check_fits(student, dataset)
    stats, how = _site_stats(student, "the model")
    keep = teacher is not None
    tstats: list[SiteStats] = []
    pairs: dict[str, SiteStats] = {}
    if keep:
        if not isinstance(teacher, nn.Module):
            raise DataError(f"teacher must be a torch.nn.Module, not {type(teacher).__name__}")
        teacher = copy.deepcopy(teacher).eval()
        check_fits(teacher, dataset)
        tstats, _ = _site_stats(teacher, "the teacher")
    device, dtype = model_device_dtype(student)
    noisy = WeightNoise(student, spec) if spec is not None else None
    hooks = Hooks(stats, keep_features=keep)
    thooks = None
    start = time.perf_counter()
    try:
        thooks = Hooks(tstats, keep_features=True) if keep else None
        with torch.no_grad():
            if noisy is not None and noise_mode == "fixed":
                noisy.apply(*fixed_stream(seed))
            for b in range(len(plan)):
                x = dataset.take(plan.indices(b))[0]
                for k in range(draws):
                    if noisy is not None and noise_mode == "resample":
                        noisy.apply(*resample_stream(seed, b, k))
                    run_model(student, x.to(device=device, dtype=dtype))
                if keep:
                    tdev, tdtype = model_device_dtype(teacher)
                    try:
                        run_model(teacher, x.to(device=tdev, dtype=tdtype))
                    except DataError as e:
                        raise DataError(f"--teacher: {e}") from None
                if progress is not None:
                    progress(int(x.shape[0]))
    finally:
        hooks.close()
        if thooks is not None:
            thooks.close()
        if noisy is not None:
            noisy.restore()
    seconds = time.perf_counter() - start

    reached = sorted((s for s in stats if s.order is not None), key=lambda s: s.order)
    if keep:
        pairs = _match(reached, sorted((s for s in tstats if s.order is not None), key=lambda s: s.order))
    rows = []
    for depth, st in enumerate(reached):
        row = layer_row(st, depth)
        if keep:
            _similarity(row, st, pairs.get(st.site.name), draws)
        row["verdict"], row["reason"] = verdict(row)
        rows.append(row)
    info = {
        "data": dataset.name, "samples": plan.samples, "batch_size": batch_size, "seconds": round(seconds, 3),
        "activations_from": how, "norm_layers": len(stats), "not_reached": [s.site.name for s in stats if s.order is None],
        "teacher": keep, "noise": None if spec is None else str(spec),
        "noise_mode": noise_mode if spec is not None else None, "noise_seed": seed if spec is not None else None,
        "noise_samples": draws if spec is not None else None,
    }
    return DiagnoseResult(rows, info)


def _site_stats(model: nn.Module, what: str) -> tuple[list[SiteStats], str]:
    sites, how = find_sites(model)
    if not sites:
        raise NoNormLayersError(f"{what} has no normalization layer (BatchNorm, GroupNorm, LayerNorm, ...): "
                                "nothing to diagnose")
    handles = {id(h.module): h for _, h in find_stat_layers(model)[0]}
    out = []
    for s in sites:
        h = handles.get(id(s.module))
        out.append(SiteStats(s, h if h is not None and _running(s.module) is not None else None))
    return out, how


def _running(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, var)`` the layer normalizes with in eval, if it keeps them."""
    mean = getattr(m, "running_mean", None)
    var = getattr(m, "running_var", None)
    if not isinstance(mean, torch.Tensor):
        return None
    if not isinstance(var, torch.Tensor):
        sq = getattr(m, "running_sq_mean", None)
        if not isinstance(sq, torch.Tensor):
            return None
        var = sq.double() - mean.double() ** 2
    return mean, var


def _r(v: float | None) -> float | None:
    """Six significant digits: more than any threshold needs, short JSON."""
    return None if v is None else float(f"{float(v):.6g}")


def layer_row(st: SiteStats, depth: int) -> dict:
    """The measures of one layer from its pooled statistics (see :mod:`normsurgeon.diagnosis.measures`)."""
    site = st.site
    row: dict = {"name": site.name, "depth": depth, "kind": site.kind, "activation": site.activation,
                 "channels": st.channels}
    parts = [st.out, st.act, st.sample_mean, st.sample_std] + ([st.inp] if st.stat_handle is not None else [])
    finite = all(p.count == 0 or (torch.isfinite(p.sum_x).all() and torch.isfinite(p.sum_x2).all()) for p in parts)
    row["finite"] = bool(finite)
    shift_max = shift_mean = lv_max = lv_mean = None
    if st.stat_handle is not None and st.inp.count > 0 and finite:
        run_mean, run_var = _running(site.module)
        eps = getattr(site.module, "eps", 1e-5)
        eps = float(eps) if isinstance(eps, (int, float)) else 1e-5
        if run_mean.numel() == st.inp.sum_x.numel():
            shift, lv = M.staleness(st.inp.mean(), st.inp.variance(), run_mean, run_var, eps)
            shift_max, shift_mean = float(shift.max()), float(shift.mean())
            worst = int(lv.abs().argmax())
            lv_max, lv_mean = float(lv[worst]), float(lv.abs().mean())
    row.update(shift_max=_r(shift_max), shift_mean=_r(shift_mean), log_var_max=_r(lv_max), log_var_mean=_r(lv_mean))
    if finite:
        pooled_var = st.out.variance()
        iv_mean, iv_std = M.instance_variability(st.sample_mean.variance(), st.sample_std.variance(), pooled_var)
        row.update(
            collapse=_r(M.collapse(st.act.mean(), st.act.sq_mean())),
            collapse_pre=_r(M.collapse(st.out.mean(), st.out.sq_mean())),
            flat=_r(M.flat_fraction(st.act.variance(), st.act.sq_mean())),
            dead=_r(M.dead_fraction(st.act.sq_mean())),
            instance_mean=_r(iv_mean), instance_std=_r(iv_std),
        )
    else:
        row.update(collapse=None, collapse_pre=None, flat=None, dead=None, instance_mean=None, instance_std=None)
    return row


def _match(student: list[SiteStats], teacher: list[SiteStats]) -> dict[str, SiteStats]:
    """Teacher layer per student layer: the same name where the teacher has it, else the same position."""
    by_name = {t.site.name: t for t in teacher}
    named = all(s.site.name in by_name for s in student)
    if named:
        return {s.site.name: by_name[s.site.name] for s in student}
    return {s.site.name: t for s, t in zip(student, teacher)}


def _similarity(row: dict, st: SiteStats, t: SiteStats | None, draws: int) -> None:
    row["teacher_layer"] = None if t is None else t.site.name
    row["cka"] = row["cosine"] = None
    if t is None:
        return
    if not st.features or not t.features:
        return
    feats = st.features
    if draws > 1 and len(feats) == draws * len(t.features):  # resample: K draws per batch, averaged
        feats = [torch.stack(feats[i:i + draws]).mean(dim=0) for i in range(0, len(feats), draws)]
    xs, xt = torch.cat(feats), t.feature_matrix()
    if xs.shape[0] != xt.shape[0] or not (torch.isfinite(xs).all() and torch.isfinite(xt).all()):
        return
    row["cka"] = _r(M.linear_cka(xs, xt))
    row["cosine"] = _r(M.mean_cosine(xs, xt))
    if row["cka"] is not None and math.isnan(row["cka"]):
        row["cka"] = None
