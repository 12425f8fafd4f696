"""Proxy Normalization (Labatie, Masters, Eaton-Rosen, Luschi, "Proxy-Normalizing Activations to
Match Batch Normalization while Removing Batch Dependence", NeurIPS 2021).

Reference code: graphcore/examples ``applications/tensorflow/cnns/training/Models/proxy_norm.py``
(TF1, commit b30108fb; ``get_rand(num_rand=200)`` and ``proxy_epsilon=0.03`` confirmed there; see
docs/recipes.md).

The block is ``conv -> Norm(x) -> y = gamma * x_hat + beta -> phi -> PN``. normsurgeon keeps
``gamma``/``beta`` in the norm's own affine (an ``nn.GroupNorm`` with affine, exactly the "merged"
form) and puts :class:`ProxyNorm` after the activation::

    PN(a) = (a - m) * (v + eps)^(-1/2)

where, per channel c, ``m`` and ``v`` are the mean and population variance of
``phi(z_i)``, ``z_i = gamma_c * (beta~_c + (1 + gamma~_c) * u_i) + beta_c`` over the
``n_samples = 200`` fixed midpoint quantiles ``u_i = Phi^-1((i + 0.5) / 200)`` of N(0, 1)
(deterministic, not random). ``eps = 0.03`` (Graphcore's ``--proxy-epsilon`` default).
``beta~``/``gamma~`` (``proxy_shift``/``proxy_scale``) are extra per-channel parameters, init 0.
Gradients flow through m and v into gamma, beta, beta~ and gamma~.

How PN reaches gamma/beta: it holds a *reference* to the module owning them (the norm), not a
copy, and not as a registered child: ``state_dict`` has each tensor once, ``deepcopy`` and fx
``GraphModule`` copies keep the link (deepcopy's memo), and loading weights into the norm is seen by
PN at once because m and v are recomputed on every call.

At eval m and v are per-channel constants, so PN is the constant affine of :meth:`eval_affine`
that ``fold`` merges into the next layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from normsurgeon.layers.moments import channel_shape

PN_EPS = 0.03  # Graphcore proxy_norm.py / --proxy-epsilon default
PN_SAMPLES = 200  # Graphcore proxy_norm.py: number of proxy quantile samples


def normal_quantiles(n: int = PN_SAMPLES, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Midpoint quantiles ``Phi^-1((i + 0.5) / n)``, i = 0..n-1, of the standard normal."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.special.ndtri(p).to(dtype)


class ProxyNorm(nn.Module):
    """Proxy normalization of an activation's output, using the affine of ``affine_source``.

    ``affine_source``: the module whose ``weight``/``bias`` (length C) are the pre-activation
    gamma/beta (None weight/bias count as 1/0). ``activation``: the deployed activation phi (a
    stateless one is copied; one with parameters, e.g. PReLU, is shared).
    """

    def __init__(self, affine_source: nn.Module, activation: nn.Module, num_features: int | None = None,
                 eps: float = PN_EPS, n_samples: int = PN_SAMPLES) -> None:
        super().__init__()
        w = getattr(affine_source, "weight", None)
        c = num_features if num_features is not None else (w.numel() if w is not None else None)
        if c is None:
            raise ValueError("ProxyNorm needs num_features when the norm has no affine weight")
        ref = w if w is not None else getattr(affine_source, "bias", None)
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        self.num_features = c
        self.eps = eps
        self.n_samples = n_samples
        self._source = [affine_source]  # a reference, not a child (see module docstring)
        has_params = any(True for _ in activation.parameters())
        self.activation = activation if has_params else copy.deepcopy(activation)
        self.proxy_shift = nn.Parameter(torch.zeros(c, **kw))  # beta~ (init 0)
        self.proxy_scale = nn.Parameter(torch.zeros(c, **kw))  # gamma~ (init 0)
        self.register_buffer("quantiles", normal_quantiles(n_samples, kw.get("dtype", torch.float32)),
                             persistent=False)

    @property
    def affine_source(self) -> nn.Module:
        return self._source[0]

    def _gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self._source[0]
        g, b = getattr(src, "weight", None), getattr(src, "bias", None)
        like = self.proxy_shift
        g = g if g is not None else torch.ones_like(like)
        b = b if b is not None else torch.zeros_like(like)
        return g, b

    def proxy_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v): mean and population variance of phi over the proxy samples, per channel."""
        g, b = self._gamma_beta()
        u = self.quantiles.to(g.dtype).unsqueeze(1)  # (n, 1)
        z = g * (self.proxy_shift + (1 + self.proxy_scale) * u) + b  # (n, C): channel dim 1
        a = self.activation(z)
        m = a.mean(dim=0)
        v = (a - m).pow(2).mean(dim=0)
        return m, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, v = self.proxy_moments()
        shape = channel_shape(x)
        return (x - m.reshape(shape).to(x.dtype)) * torch.rsqrt(v + self.eps).reshape(shape).to(x.dtype)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PN as ``scale * a + shift`` (constants once training stops): the fold protocol."""
        m, v = self.proxy_moments()
        scale = torch.rsqrt(v + self.eps)
        return scale, -m * scale

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, n_samples={self.n_samples}"
