"""ENorm interleaved with SGD (Stock et al. 2019; facebookresearch/enorm ``main.py``: one ENorm
cycle after every SGD step, momentum buffers rescaled inversely to their weights).

Usage::

    cb = EqualizeCallback(model, optimizer, every=1, c=1.1, input_shape=(2, 1, 8, 8))
    for x, y in data:
        loss(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        cb.step()

Exact like the ``equalize`` verb (biases scaled; norms never crossed: a BN/GN's own affine is the
producer, which is exact in train mode too). A parameter multiplied by s has its gradient divided
by s, so the optimizer state follows: SGD ``momentum_buffer`` /= s; Adam/AdamW ``exp_avg`` /= s and
``exp_avg_sq`` /= s^2 (and ``max_exp_avg_sq``). ``skip_last=True`` reproduces the reference, which
never balances the last pair.
"""
from __future__ import annotations

import torch
from torch import nn

from normsurgeon.graph.probe import probe_input
from normsurgeon.passes.equalize import build_plan, sweep


class EqualizeCallback:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, every: int = 1,
                 c: float = 1.1, sweeps: int = 1, skip_last: bool = False,
                 input_shape: tuple[int, ...] | None = None) -> None:
        if every < 1 or sweeps < 1:
            raise ValueError("every and sweeps must be positive")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.c = c
        self.sweeps = sweeps
        self.plan = build_plan(model, probe_input(model, tuple(input_shape) if input_shape else None))
        self.pairs = self.plan.pairs[:-1] if skip_last and self.plan.pairs else self.plan.pairs
        self.steps = 0

    def _rescale_state(self, p: nn.Parameter, s: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(p)
        if not state:
            return
        with torch.no_grad():
            for key, power in (("momentum_buffer", 1), ("exp_avg", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 2)):
                buf = state.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    buf.div_(s.pow(power))

    def apply(self) -> None:
        """One or more sweeps now, regardless of the step count."""
        for _ in range(self.sweeps):
            sweep(self.model, self.plan, self.c, hook=self._rescale_state, pairs=self.pairs)

    def step(self) -> bool:
        """Call after ``optimizer.step()``; sweeps every ``every`` calls. Returns whether it swept."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.apply()
        return True
