"""Proxy norm: constants vs a Monte-Carlo estimate, the formula re-derived, gradients, eval affine."""
import copy
import math

import torch
from torch import nn

from normsurgeon.layers.proxy_norm import ProxyNorm, normal_quantiles


def _pn(c=5, act=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(1, c).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(c, generator=g, dtype=dtype) * 1.5 + 0.25)
        norm.bias.copy_(torch.randn(c, generator=g, dtype=dtype) * 0.5)
    pn = ProxyNorm(norm, act or nn.ReLU())
    with torch.no_grad():
        pn.proxy_shift.copy_(torch.randn(c, generator=g, dtype=dtype) * 0.3)
        pn.proxy_scale.copy_(torch.randn(c, generator=g, dtype=dtype) * 0.3)
    return norm, pn


def test_quantiles_are_normal_midpoints():
    u = normal_quantiles(200)
    p = torch.tensor([(i + 0.5) / 200 for i in range(200)], dtype=torch.float64)
    # Phi(u) recovers the midpoint probabilities
    assert torch.allclose(0.5 * (1 + torch.erf(u / math.sqrt(2))), p, atol=1e-12)


def test_relu_init_constants_match_reference_values():
    norm = nn.GroupNorm(1, 3).double()
    pn = ProxyNorm(norm, nn.ReLU())
    m, v = pn.proxy_moments()
    # Graphcore-code values at init with ReLU (Graphcore's code: m = 0.39845, 1/sqrt(v + 0.03) = 1.6484)
    assert torch.allclose(m, torch.full((3,), 0.39845, dtype=torch.float64), atol=5e-5)
    assert torch.allclose(torch.rsqrt(v + 0.03), torch.full((3,), 1.6484, dtype=torch.float64), atol=5e-4)


def test_constants_match_monte_carlo():
    for act in (nn.ReLU(), nn.SiLU(), nn.GELU()):
        _, pn = _pn(c=4, act=act)
        m, v = pn.proxy_moments()
        g = torch.Generator().manual_seed(1)
        y = torch.randn(400_000, 1, generator=g, dtype=torch.float64)
        gamma, beta = pn.affine_source.weight, pn.affine_source.bias
        z = gamma * (pn.proxy_shift + (1 + pn.proxy_scale) * y) + beta
        a = act(z).detach()
        # 200 deterministic quantiles vs 4e5 random draws: agree to ~1% of the spread
        assert torch.allclose(m.detach(), a.mean(0), atol=0.02 * float(a.std(0).max()))
        assert torch.allclose(v.detach(), a.var(0), rtol=0.03)


def test_forward_is_the_formula():
    norm, pn = _pn(c=6)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    a = torch.relu(norm(x))
    u = torch.tensor([torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((i + 0.5) / 200)).item()
                      for i in range(200)], dtype=torch.float64)
    out = pn(a)
    for c in range(6):
        z = norm.weight[c] * (pn.proxy_shift[c] + (1 + pn.proxy_scale[c]) * u) + norm.bias[c]
        phi = torch.relu(z)
        m, v = phi.mean(), ((phi - phi.mean()) ** 2).mean()
        ref = (a[:, c] - m) / torch.sqrt(v + 0.03)
        assert torch.allclose(out[:, c], ref, atol=1e-6)


def test_gradcheck_through_constants():
    norm, pn = _pn(c=3, act=nn.SiLU())
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = (norm.weight, norm.bias, pn.proxy_shift, pn.proxy_scale)

    def g(x, w, b, s, t):
        nw, nb = w, b
        a = nn.functional.silu(nn.functional.group_norm(x, 1, nw, nb, norm.eps))
        src = nn.Module()
        src.weight, src.bias = nw, nb
        p2 = ProxyNorm.__new__(ProxyNorm)
        nn.Module.__init__(p2)
        p2._source, p2.activation, p2.eps, p2.n_samples, p2.num_features = [src], nn.SiLU(), 0.03, 200, 3
        p2.proxy_shift, p2.proxy_scale = s, t
        p2.register_buffer("quantiles", normal_quantiles(200), persistent=False)
        return p2(a)

    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-5)
    # and the real module passes gradients to all four parameters
    out = pn(nn.functional.silu(norm(x))).sum()
    out.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)


def test_eval_affine_equals_forward_and_follows_loaded_weights():
    norm, pn = _pn(c=4)
    a = torch.rand(2, 4, 3, 3, dtype=torch.float64)
    s, t = pn.eval_affine()
    assert torch.allclose(pn(a), a * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), atol=1e-12)
    before = pn(a)
    with torch.no_grad():
        norm.weight.mul_(2.0)  # loading new gamma into the norm changes PN at once
    assert not torch.allclose(pn(a), before)


def test_deepcopy_keeps_the_link_and_state_dict_has_no_duplicates():
    norm, pn = _pn(c=4)
    model = nn.Sequential(nn.Conv2d(2, 4, 1).double(), norm, nn.ReLU(), pn)
    clone = copy.deepcopy(model)
    assert clone[3].affine_source is clone[1]
    keys = list(model.state_dict())
    assert "3.proxy_shift" in keys and not any(k.startswith("3.") and k.endswith(("weight", "bias")) for k in keys)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert torch.allclose(fresh(x), model(x))
