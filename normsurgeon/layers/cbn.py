"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang, Lin, "Cross-Iteration Batch
Normalization", CVPR 2021; reference code Howal/Cross-iterationBatchNorm ``mmdet/models/utils/CBN.py``).

In training, the statistics of the current mini-batch are pooled with those of the ``window - 1``
previous iterations. Past statistics were computed under past weights, so each is first moved to the
current weights of the **producing layer** (the conv or linear feeding this norm) with a first-order
Taylor term::

    mu_{t-tau}(theta_t)  ~ mu_{t-tau}  + d mu_{t-tau}/d theta  . (theta_t - theta_{t-tau})
    nu_{t-tau}(theta_t)  ~ nu_{t-tau}  + d nu_{t-tau}/d theta  . (theta_t - theta_{t-tau})     (nu = E[x^2])

    mu_bar = 1/k sum_tau mu_{t-tau}(theta_t)
    nu_bar = 1/k sum_tau max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)
    y = gamma (x - mu_bar) / sqrt(nu_bar - mu_bar^2 + eps) + beta

The gradients ``d mu / d theta`` (one row per output channel: mu_c depends only on filter c) are taken
with ``torch.autograd.grad`` on the current iteration's graph, as the reference does, and stored with
the statistics and a copy of the weights. Gradients flow only through the current iteration's
statistics (the stored ones are constants). ``k`` counts the current iteration (``window - 1`` stored
ones); fewer are used while the store fills up. During the first ``burnin`` training iterations the
layer is plain BN (batch statistics, nothing stored): early weights change too fast for a first-order
compensation.

The layer needs the producing module, given with :meth:`attach` (``convert --to cbn`` does it); it is
held by reference, not as a child, so the model's module tree and state dict are unchanged. Without
one (or when the producer's weights do not require grad) the window is pooled without compensation.

Eval: running statistics (momentum 0.1, updated with the current batch's mean and unbiased variance as
in the reference), a constant per-channel affine, so it folds like BN. Recalibration protocol:
running_mean/running_var, population variance.

Constants: eps 1e-5 and momentum 0.1 as in the reference (``CBatchNorm2d`` defaults). ``window`` 8 and
``burnin`` 100 iterations are **not verified** against the paper's text: the reference's defaults are
``buffer_num=0`` (plain BN) and ``burnin=0``, its configs use buffers of 1-8 past iterations and
burn-ins counted in epochs; 8 (k = 8) and 100 iterations are normsurgeon choices for small runs.
Differences from the reference, on purpose: ``max(nu, mu^2)`` per iteration as in the paper (the
reference drops iterations whose compensated variance is negative), eps inside the square root (the
reference's default adds it to the standard deviation), and iterations stored from the first
post-burn-in step. The first-order term misses the (always positive) second-order part of E[x^2],
so with large weight steps pooled variances run low and the running statistics fit the network
poorly: recalibrate after a short constant-lr run (benchmarks/microbatch_choices.py).
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from normsurgeon.layers.moments import MeanVarMoments, apply_running_affine, channel_shape, running_affine

CBN_WINDOW = 8  # k, unverified (see module docstring)
CBN_BURNIN = 100  # iterations of plain BN first, a normsurgeon choice (see module docstring)
CBN_EPS = 1e-5  # reference default
CBN_MOMENTUM = 0.1  # reference default


def compensate(mu, nu, dmu, dnu, old_params, params):
    """Past statistics moved to the current parameters by the first-order Taylor term.

    ``dmu``/``dnu``/``old_params``/``params``: matching lists of tensors whose dim 0 indexes the
    channel (the producer's weight, and its bias when present). Returns ``(mu', max(nu', mu'^2))``.
    """
    mu_c, nu_c = mu.clone(), nu.clone()
    for gm, gn, old, new in zip(dmu, dnu, old_params, params):
        delta = (new - old).reshape(new.shape[0], -1)
        mu_c = mu_c + (gm.reshape(delta.shape) * delta).sum(1)
        nu_c = nu_c + (gn.reshape(delta.shape) * delta).sum(1)
    return mu_c, torch.maximum(nu_c, mu_c * mu_c)


class CrossIterationBatchNorm(MeanVarMoments, nn.Module):
    def __init__(self, num_features: int, window: int = CBN_WINDOW, burnin: int = CBN_BURNIN,
                 eps: float = CBN_EPS, momentum: float = CBN_MOMENTUM) -> None:
        super().__init__()
        if window < 1:
            raise ValueError("window must be a positive integer")
        self.num_features = num_features
        self.window = int(window)
        self.burnin = int(burnin)
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self._producer: list[nn.Module] = []  # a list: held by reference, not registered as a child
        self._store: deque = deque(maxlen=max(self.window - 1, 0))

    # ------------------------------------------------------------------ wiring
    def attach(self, producer: nn.Module | None) -> "CrossIterationBatchNorm":
        """Use ``producer``'s weight (and bias) for the Taylor compensation; None detaches."""
        self._producer = [producer] if producer is not None else []
        self._store.clear()
        return self

    @property
    def producer(self) -> nn.Module | None:
        return self._producer[0] if self._producer else None

    def _params(self) -> list[torch.Tensor]:
        p = self.producer
        if p is None:
            return []
        out = [t for t in (getattr(p, "weight", None), getattr(p, "bias", None))
               if isinstance(t, torch.Tensor) and t.requires_grad and t.shape[:1] == (self.num_features,)]
        return out

    def reset_window(self) -> None:
        self._store.clear()

    # ------------------------------------------------------------------ forward
    def _pooled(self, x: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor):
        """(mean, var) pooled over the window; stores this iteration."""
        if self._store and self._store[0][0].device != mu.device:  # the model moved: stale iterations
            self._store.clear()
        params = self._params()
        grads_ok = bool(params) and torch.is_grad_enabled() and mu.requires_grad
        if grads_ok:
            ones = torch.ones_like(mu)
            dmu = torch.autograd.grad(mu, params, ones, retain_graph=True, allow_unused=True)
            dnu = torch.autograd.grad(nu, params, ones, retain_graph=True, allow_unused=True)
            dmu = [torch.zeros_like(p) if g is None else g for g, p in zip(dmu, params)]
            dnu = [torch.zeros_like(p) if g is None else g for g, p in zip(dnu, params)]
        else:
            params, dmu, dnu = [], [], []
        now = [p.detach() for p in params]
        mus, nus = [mu], [nu]
        for s_mu, s_nu, s_dmu, s_dnu, s_params in self._store:
            if len(s_params) == len(now):
                m, n = compensate(s_mu, s_nu, s_dmu, s_dnu, s_params, now)
            else:  # the producer changed (attached or detached): no compensation possible
                m, n = s_mu, torch.maximum(s_nu, s_mu * s_mu)
            mus.append(m.to(mu.dtype))
            nus.append(n.to(nu.dtype))
        if self._store.maxlen:
            self._store.appendleft((mu.detach(), nu.detach(), [g.detach() for g in dmu], [g.detach() for g in dnu],
                                    [p.clone() for p in now]))
        mean = torch.stack(mus).mean(0)
        var = (torch.stack(nus).mean(0) - mean * mean).clamp_min(0)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = channel_shape(x)
        if not self.training:
            return apply_running_affine(self, x)
        dims = self.moment_axes(x)
        mu = x.mean(dim=dims)
        nu = (x * x).mean(dim=dims)
        self.num_batches_tracked += 1
        if int(self.num_batches_tracked) <= self.burnin or self.window == 1:
            mean, var = mu, (nu - mu * mu).clamp_min(0)
        else:
            mean, var = self._pooled(x, mu, nu)
        with torch.no_grad():  # the current batch's statistics, as the reference (unbiased variance)
            m, n = self.momentum, x.numel() // x.shape[1]
            cur_var = (nu - mu * mu).clamp_min(0) * (n / max(n - 1, 1))
            self.running_mean.mul_(1 - m).add_(m * mu.detach().to(self.running_mean.dtype))
            self.running_var.mul_(1 - m).add_(m * cur_var.detach().to(self.running_var.dtype))
        y = (x - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return running_affine(self)

    def __getstate__(self):  # the window is training scratch: not pickled (it holds autograd-free copies)
        state = self.__dict__.copy()
        state["_store"] = deque(maxlen=self._store.maxlen)
        return state

    def extra_repr(self) -> str:
        comp = "compensated" if self.producer is not None else "no producer: uncompensated"
        return f"{self.num_features}, window={self.window}, burnin={self.burnin}, eps={self.eps}, {comp}"
