"""Batch Kalman Normalization (Wang, Peng, Luo, Wang, Lin, "Batch Kalman Normalization: Towards
Training Deep Neural Networks with Micro-Batches", arXiv 1802.03133, 2018 / NeurIPS 2018 as "Kalman
Normalization"; authors' TensorFlow code wanggrun/Kalman-Normalization ``KalmanNorm/kalman_norm.py``).

A layer's statistics are estimated from its own micro-batch **and** the estimate of the preceding
normalization layer, Kalman-style: a prior predicted from the preceding layer through a transition,
corrected by the current observation with gain q::

    prior      mu_p, var_p   = transition(preceding layer's estimate)
    observe    xbar, S       = mean and (biased) variance of this micro-batch, per channel
    posterior  mu  = (1 - q) mu_p  + q xbar
               var = (1 - q) var_p + q S + q (1 - q) (xbar - mu_p)^2
    y = gamma (x - mu) / sqrt(var + eps) + beta

(the posterior mean/variance are those of the two-component mixture, as in the authors' code).

The transition. The paper writes it as a matrix A^k carrying layer k-1's statistics to layer k; the
authors' code instead pushes a random sample drawn from the preceding statistics through the layer's
own conv. Here the transition is learned and acts on *deviations from the running estimates*, so an
untrained transition (zeros) predicts the running estimates themselves::

    d   = (mu_{k-1} - m_{k-1}) / sqrt(v_{k-1} + eps)            preceding layer, standardized (C')
    e   = log(var_{k-1} + eps) - log(v_{k-1} + eps)
    mu_p  = m_k + sqrt(v_k + eps) * (A d)                         A: C x C', init 0 (``transition``)
    var_p = v_k * exp(clamp(B e, -10, 10))                        B: C x C', init 0 (``transition_var``)

with m, v the running mean/variance of each layer. This parametrization is a normsurgeon choice (the
paper does not state how A is parametrized or initialised); the preceding estimate enters detached.

Which layer precedes: the previous ``BatchKalmanNorm`` that ran a training forward in this thread,
provided it was created earlier (conversion creates them in graph order) and has C' channels, C' being
the input channels of this layer's producing conv (set at construction). Otherwise, and for the first
layer, the prior is the running estimate alone. Safety rule from the authors' code: when the prior
variance averages >= 100 times the observed one the observation is used alone.

Constants. Gain q = 0.5, a normsurgeon choice: the authors' code mixes ``p_rate = 0.9`` of the prior
(q = 0.1), but its prior is pushed through the current conv weights, while the prior here starts from
running estimates that lag the weights; with q = 0.1 the digits CNN trained at batch 2 barely learns
(benchmarks/microbatch_choices.py: 12.8% test accuracy after 150 steps, against 41.5% with q = 0.5 and
54.8% with q = 1, i.e. plain BN; 3 seeds). Running estimates: an EMA (momentum 0.1, the authors'
decay 0.9) of the *observed* batch statistics, as BN keeps them. The authors average the posterior;
with a prior built from the running estimates that average feeds back on itself (an effective rate of
q times the momentum) and, in a trial run on the digits CNN, lagged far behind the population
statistics. eps 1e-5. Eval: running statistics, a constant per-channel affine that
folds like BN; recalibration protocol as BN (population variance).
"""
from __future__ import annotations

import itertools
import threading

import torch
from torch import nn

from normsurgeon.layers.moments import MeanVarMoments, apply_running_affine, channel_shape, running_affine

BKN_GAIN = 0.5  # normsurgeon choice (authors' code: 0.1, i.e. p_rate = 0.9 on the prior); see docstring
BKN_MOMENTUM = 0.1  # authors' code: EMA decay 0.9
BKN_EPS = 1e-5
BKN_PRIOR_RATIO = 100.0  # authors' code: prior ignored when mean(prior var / batch var) >= 100

_serial = itertools.count()
_last = threading.local()  # .record = (serial, channels, d, e) of the last training forward


class BatchKalmanNorm(MeanVarMoments, nn.Module):
    def __init__(self, num_features: int, prev_features: int | None = None, gain: float = BKN_GAIN,
                 eps: float = BKN_EPS, momentum: float = BKN_MOMENTUM) -> None:
        super().__init__()
        if not 0.0 < gain <= 1.0:
            raise ValueError("gain must lie in (0, 1]")
        self.num_features = num_features
        self.prev_features = prev_features
        self.gain = float(gain)
        self.eps = eps
        self.momentum = momentum
        self.serial = next(_serial)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        if prev_features:
            self.transition = nn.Parameter(torch.zeros(num_features, prev_features))
            self.transition_var = nn.Parameter(torch.zeros(num_features, prev_features))
        else:
            self.register_parameter("transition", None)
            self.register_parameter("transition_var", None)

    # ------------------------------------------------------------------ the Kalman step
    def _preceding(self):
        rec = getattr(_last, "record", None)
        if rec is None or self.transition is None:
            return None
        serial, channels, d, e = rec
        if serial >= self.serial or channels != self.prev_features:
            return None
        return d, e

    def prior(self, preceding=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_p, var_p) from the running estimates and, when given, the preceding (d, e)."""
        m, v = self.running_mean.clone(), self.running_var.clone()  # the buffers update in place later
        if preceding is None:
            return m, v
        d, e = preceding
        mu_p = m + torch.sqrt(v + self.eps) * (self.transition @ d.to(self.transition.dtype))
        var_p = v * torch.exp((self.transition_var @ e.to(self.transition.dtype)).clamp(-10, 10))
        return mu_p, var_p

    def posterior(self, xbar: torch.Tensor, s: torch.Tensor, mu_p: torch.Tensor, var_p: torch.Tensor):
        q = self.gain
        with torch.no_grad():
            use_prior = bool((var_p / s.clamp_min(1e-12)).mean() < BKN_PRIOR_RATIO)
        if not use_prior or q == 1.0:
            return xbar, s
        mu = (1 - q) * mu_p + q * xbar
        var = (1 - q) * var_p + q * s + q * (1 - q) * (xbar - mu_p) ** 2
        return mu, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = channel_shape(x)
        if not self.training:
            return apply_running_affine(self, x)
        dims = self.moment_axes(x)
        xbar = x.mean(dim=dims)
        s = (x * x).mean(dim=dims) - xbar * xbar
        s = s.clamp_min(0)
        mu_p, var_p = self.prior(self._preceding())
        mu, var = self.posterior(xbar, s, mu_p.to(x.dtype), var_p.to(x.dtype))
        with torch.no_grad():
            m_old, v_old = self.running_mean.clone(), self.running_var.clone()
            k = self.momentum
            self.running_mean.mul_(1 - k).add_(k * xbar.detach().to(m_old.dtype))  # the observation, as BN
            self.running_var.mul_(1 - k).add_(k * s.detach().to(v_old.dtype))
            d = (mu.detach() - m_old) / torch.sqrt(v_old + self.eps)
            e = torch.log(var.detach() + self.eps) - torch.log(v_old + self.eps)
            _last.record = (self.serial, self.num_features, d, e)
        y = (x - mu.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return running_affine(self)

    def __setstate__(self, state):  # a loaded copy is a new layer: it gets a new serial (after existing ones)
        super().__setstate__(state)
        self.serial = next(_serial)

    def extra_repr(self) -> str:
        prev = f", preceding={self.prev_features}" if self.prev_features else ", first"
        return f"{self.num_features}{prev}, gain={self.gain:g}, eps={self.eps}"


def clear_preceding() -> None:
    """Forget the last recorded estimate in this thread (e.g. between two models trained in turn)."""
    _last.record = None
