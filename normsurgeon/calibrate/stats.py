"""Exact pooled moments: per-statistic sum, sum of squares and count, accumulated in float64.

Recalibration pools every value a layer sees: E[x] = sum(x) / n and E[x^2] = sum(x^2) / n over all
batches, noise draws and ranks, so the result is the mean and variance of the whole calibration set
(not a momentum average, not an average of per-batch variances, which drops the spread of the batch
means: the mistake other tools make, AIMET among them, and torch's ``momentum=None``).

Cost matters (the pass should run at eval-forward speed), so
:func:`normsurgeon.layers.moments.moment_sums` takes partial sums in the activation dtype (per
sample over its positions, or per position over the batch when there are few positions; ~1e-7
relative in float32) and pools those partials in float64. A float64 model is reduced in float64
throughout. This is several times faster on CPU than casting the activation to float64 first, and as
exact as the float32 activations themselves (``benchmarks/moment_reductions.py`` compares the ways).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PooledMoments:
    """Running float64 sums for one layer; ``calls`` counts forward calls that reached it."""

    sum_x: torch.Tensor | None = None
    sum_x2: torch.Tensor | None = None
    count: int = 0
    calls: int = 0
    _shape: tuple[int, ...] = field(default=(), repr=False)

    def add(self, s: torch.Tensor, s2: torch.Tensor, n: int) -> None:
        s, s2 = s.detach().double(), s2.detach().double()
        if self.sum_x is None:
            self.sum_x, self.sum_x2, self._shape = s.clone(), s2.clone(), tuple(s.shape)
        else:
            self.sum_x += s
            self.sum_x2 += s2
        self.count_batch(n)

    def sums(self, size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The float64 accumulators (zeros on first use) for a kernel that adds into them in place;
        it then calls :meth:`count_batch`."""
        if self.sum_x is None:
            self.sum_x = torch.zeros(size, dtype=torch.float64, device=device)
            self.sum_x2 = torch.zeros(size, dtype=torch.float64, device=device)
            self._shape = (size,)
        return self.sum_x, self.sum_x2

    def count_batch(self, n: int) -> None:
        self.count += int(n)
        self.calls += 1

    def mean(self) -> torch.Tensor:
        return self.sum_x / self.count

    def sq_mean(self) -> torch.Tensor:
        return self.sum_x2 / self.count

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """Pooled variance E[x^2] - E[x]^2 (times n/(n-1) when ``unbiased``), clamped at 0."""
        m = self.mean()
        var = (self.sq_mean() - m * m).clamp_min(0)
        if unbiased and self.count > 1:
            var = var * (self.count / (self.count - 1))
        return var

    # ---------------------------------------------------------------- packing for all-reduce
    def pack(self, size: int) -> torch.Tensor:
        """``[sum_x, sum_x2, count, calls]`` as one float64 vector (zeros when nothing was seen)."""
        if self.sum_x is None:
            z = torch.zeros(size, dtype=torch.float64)
            return torch.cat([z, z, torch.zeros(2, dtype=torch.float64)])
        extra = torch.tensor([float(self.count), float(self.calls)], dtype=torch.float64)
        return torch.cat([self.sum_x.reshape(-1).cpu(), self.sum_x2.reshape(-1).cpu(), extra])

    @classmethod
    def unpack(cls, flat: torch.Tensor, shape: tuple[int, ...]) -> "PooledMoments":
        size = flat.numel() // 2 - 1
        count, calls = int(round(float(flat[2 * size]))), int(round(float(flat[2 * size + 1])))
        if count == 0:
            return cls()
        return cls(flat[:size].reshape(shape).clone(), flat[size:2 * size].reshape(shape).clone(),
                   count, calls, tuple(shape))
