"""Which layers recalibration re-estimates, behind one protocol.

The protocol (described in :mod:`normsurgeon.layers`): ``reset_running_stats()``,
``batch_moments(x) -> (sum_x, sum_x2, count)`` in float64 shaped like the running buffers, and
``load_moments(mean, sq_mean, count)``. normsurgeon's recipe layers with running estimates implement
it themselves; any module that exposes those three methods is recalibrated, whatever its class.
torch's own ``_BatchNorm`` (and subclasses such as timm's ``BatchNormAct2d``) get
:class:`BatchNormStats`, an adapter.

During the statistics pass each layer normalizes with the statistics of the batch it is seeing
(``use_batch``), as torch's BN does in training, while the model stays in eval mode (dropout off).

running_var convention for torch BN: PyTorch stores the *unbiased* variance in ``running_var``
(its training update multiplies the batch variance by n/(n-1)). The adapter keeps that convention:
``running_var = n/(n-1) * (E[x^2] - E[x]^2)`` with n the pooled count of values per channel (at
n = 10^4 values the factor is 1.0001). Recipe layers keep their own convention (population variance,
or E[x^2] itself), as documented in :mod:`normsurgeon.layers`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normsurgeon.layers.moments import moment_sums as moments
from normsurgeon.graph.modules import describe
from normsurgeon.report import Change

PROTOCOL = ("reset_running_stats", "batch_moments", "load_moments")


def has_protocol(m: nn.Module) -> bool:
    return all(callable(getattr(m, name, None)) for name in PROTOCOL)


class BatchNormStats:
    """The recalibration protocol for a torch ``_BatchNorm`` module."""

    def __init__(self, bn: _BatchNorm) -> None:
        self.module = bn

    def reset_running_stats(self) -> None:
        self.module.reset_running_stats()

    def batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return moments(x)

    @torch.no_grad()
    def load_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:
        """Pooled statistics; running_var is unbiased (PyTorch's convention, see module docstring)."""
        var = (sq_mean.double() - mean.double() ** 2).clamp_min(0)
        if count > 1:
            var = var * (count / (count - 1))
        self._set(mean.double(), var)

    @torch.no_grad()
    def use_batch(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:
        """Make the eval forward normalize with this batch's statistics (biased var, as in training)."""
        self._set(mean, torch.addcmul(sq_mean, mean, mean, value=-1).clamp_min_(0))

    def _set(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        bn = self.module
        bn.running_mean.copy_(mean)  # copy_ casts to the buffer's dtype
        bn.running_var.copy_(var)

    def set_calls(self, calls: int) -> None:
        if getattr(self.module, "num_batches_tracked", None) is not None:
            self.module.num_batches_tracked.fill_(int(calls))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.running_mean.detach().clone(), self.module.running_var.detach().clone()


class LayerStats:
    """A module implementing the protocol itself (normsurgeon's recipe layers, or any other)."""

    def __init__(self, layer: nn.Module) -> None:
        self.module = layer

    def reset_running_stats(self) -> None:
        self.module.reset_running_stats()

    def batch_moments(self, x: torch.Tensor):
        return self.module.batch_moments(x)

    def load_moments(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:
        self.module.load_moments(mean, sq_mean, count)

    def use_batch(self, mean: torch.Tensor, sq_mean: torch.Tensor, count: int) -> None:
        self.module.load_moments(mean, sq_mean, count)

    def set_calls(self, calls: int) -> None:
        pass

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        mean = getattr(m, "running_mean", None)
        second = getattr(m, "running_var", getattr(m, "running_sq_mean", None))
        z = torch.zeros(0)
        return (mean.detach().clone() if isinstance(mean, torch.Tensor) else z,
                second.detach().clone() if isinstance(second, torch.Tensor) else z)


def find_stat_layers(model: nn.Module) -> tuple[list[tuple[str, BatchNormStats | LayerStats]], list[Change]]:
    """``(name, handle)`` for every layer whose running statistics can be re-estimated, and a
    ``skipped`` Change (with the reason) for every norm-like layer that cannot."""
    found: list[tuple[str, BatchNormStats | LayerStats]] = []
    skipped: list[Change] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, _BatchNorm):
            if not m.track_running_stats or m.running_mean is None:
                skipped.append(Change(name, "skipped", describe(m), detail="track_running_stats=False: it always "
                                      "normalizes with batch statistics; nothing to re-estimate"))
            else:
                found.append((name, BatchNormStats(m)))
        elif has_protocol(m):
            found.append((name, LayerStats(m)))
        elif isinstance(getattr(m, "running_mean", None), torch.Tensor):
            skipped.append(Change(name, "skipped", describe(m), detail="fixed statistics (no batch_moments/"
                                  "load_moments): left as they are"))
    return found, skipped
