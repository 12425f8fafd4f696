"""The statistics ``diagnose`` gathers in its one pass: forward hooks on every norm layer.

Per site and per call, with ``x`` the norm's input, ``y`` its output and ``a = post(y)`` the block
output (after the activation, see :mod:`normsurgeon.diagnosis.sites`):

- ``inp``: per-channel sums of ``x`` in the layer's own statistics view (``batch_moments`` of the
  recalibration protocol), only for layers with running estimates: the statistics recalibration
  would load, for the staleness measure;
- ``out`` / ``act``: per-channel sums of ``y`` / ``a`` over samples and positions;
- ``sample_mean`` / ``sample_std``: sums over samples of the per-sample channel means / standard
  deviations of ``y``;
- ``features``: the per-sample channel means of ``a`` (``(N, C)``, float64), kept only when a
  teacher is compared.

Everything is pooled in float64 by :class:`~normsurgeon.calibrate.stats.PooledMoments` (exact sums,
no average of per-batch figures), so the result does not depend on the batch size. As in
recalibration, partial reductions (one sample's positions) are taken in the activation's dtype
(~1e-7 relative in float32) and everything after that in float64; no float64 copy of an activation
is made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from normsurgeon.calibrate.stats import PooledMoments
from normsurgeon.diagnosis.measures import channels_first, per_sample_stats
from normsurgeon.diagnosis.sites import Site
from normsurgeon.layers.moments import moment_sums


@dataclass
class SiteStats:
    site: Site
    stat_handle: object | None = None  # the recalibration protocol handle, for layers with running estimates
    inp: PooledMoments = field(default_factory=PooledMoments)
    out: PooledMoments = field(default_factory=PooledMoments)
    act: PooledMoments = field(default_factory=PooledMoments)
    sample_mean: PooledMoments = field(default_factory=PooledMoments)
    sample_std: PooledMoments = field(default_factory=PooledMoments)
    features: list[torch.Tensor] | None = None
    order: int | None = None  # first-call position in the forward pass
    channels: int = 0

    def feature_matrix(self) -> torch.Tensor | None:
        return torch.cat(self.features) if self.features else None


def _add(acc: PooledMoments, v: torch.Tensor) -> None:
    s, s2, n = moment_sums(v)
    acc.add(s, s2, n)


class Hooks:
    """Forward hooks collecting :class:`SiteStats` for each site; ``close()`` removes them."""

    def __init__(self, stats: list[SiteStats], keep_features: bool = False) -> None:
        self.stats = stats
        self._calls = 0
        self._handles = []
        try:
            for st in stats:
                if keep_features:
                    st.features = []
                self._handles.append(st.site.module.register_forward_hook(self._hook(st)))
        except BaseException:
            self.close()
            raise

    def _hook(self, st: SiteStats):

        def hook(module, args, output):
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return None
            if st.order is None:
                st.order, self._calls = self._calls, self._calls + 1
            with torch.no_grad():
                x, y = args[0], output
                cl = st.site.channel_last(y)
                if st.stat_handle is not None:
                    s, s2, n = st.stat_handle.batch_moments(x)
                    st.inp.add(s, s2, n)
                y3 = channels_first(y, cl)
                st.channels = int(y3.shape[1])
                _add(st.out, y3)
                m, sd = per_sample_stats(y3)
                _add(st.sample_mean, m)
                _add(st.sample_std, sd)
                a = st.site.post(y) if st.site.post is not None else y
                a3 = channels_first(a, cl)
                _add(st.act, a3)
                if st.features is not None:
                    st.features.append(a3.mean(dim=2).double().cpu())
            return None

        return hook

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()
