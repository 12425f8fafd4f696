"""Batch Kalman Normalization: the Kalman update of two chained layers against an independent float64
computation, the authors' safety rule, gradcheck (input and transition), micro-batch training, fold."""
import copy

import torch
from torch import nn
from torch.func import functional_call

import normsurgeon
from normsurgeon.layers import BatchKalmanNorm
from normsurgeon.layers.bkn import clear_preceding
from tests import layers_train

EPS = 1e-5


def _chain(seed=0):
    g = torch.Generator().manual_seed(seed)
    clear_preceding()
    first = BatchKalmanNorm(3, gain=0.3).double()
    second = BatchKalmanNorm(4, prev_features=3, gain=0.3).double()
    with torch.no_grad():
        for m in (first, second):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g))
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        second.transition.copy_(torch.randn(4, 3, generator=g) * 0.5)
        second.transition_var.copy_(torch.randn(4, 3, generator=g) * 0.5)
    return first, second


def _kalman(x, mu_p, var_p, q):
    xbar = x.mean(dim=(0, 2, 3))
    s = x.var(dim=(0, 2, 3), unbiased=False)
    mu = (1 - q) * mu_p + q * xbar
    var = (1 - q) * var_p + q * s + q * (1 - q) * (xbar - mu_p) ** 2
    return mu, var


def _normalize(x, mu, var, m):
    y = (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
    return y * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)


def test_two_layer_kalman_update_matches_independent_computation():
    first, second = _chain()
    m1, v1 = first.running_mean.clone(), first.running_var.clone()
    m2, v2 = second.running_mean.clone(), second.running_var.clone()
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 1.5 + 0.5
    x2 = torch.randn(2, 4, 4, 4, dtype=torch.float64) * 0.7 - 0.3
    y1, y2 = first.train()(x1), second.train()(x2)
    mu1, var1 = _kalman(x1, m1, v1, 0.3)  # the first layer's prior: its own running estimates
    assert torch.allclose(y1, _normalize(x1, mu1, var1, first))
    d = (mu1 - m1) / torch.sqrt(v1 + EPS)
    e = torch.log(var1 + EPS) - torch.log(v1 + EPS)
    mu_p = m2 + torch.sqrt(v2 + EPS) * (second.transition.detach() @ d)
    var_p = v2 * torch.exp(second.transition_var.detach() @ e)
    mu2, var2 = _kalman(x2, mu_p, var_p, 0.3)
    assert torch.allclose(y2, _normalize(x2, mu2, var2, second))
    xbar, s = x2.mean(dim=(0, 2, 3)), x2.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(second.running_mean, 0.9 * m2 + 0.1 * xbar)  # EMA of the observation, as BN
    assert torch.allclose(second.running_var, 0.9 * v2 + 0.1 * s)


def test_no_preceding_estimate_from_a_later_layer_or_a_wrong_width():
    first, second = _chain()
    x2 = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    second.train()(x2)
    assert second._preceding() is None  # its own record (not created earlier)
    other = BatchKalmanNorm(5, prev_features=4).double()  # created after `second`, but expects 4 channels
    second.train()(x2)
    assert other._preceding() is not None
    first.train()(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert other._preceding() is None  # 3 channels recorded, 4 expected


def test_prior_ignored_when_its_variance_dwarfs_the_batch():
    first, _ = _chain()
    with torch.no_grad():
        first.running_var.fill_(1e4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(first.weight)
        bn.bias.copy_(first.bias)
    assert torch.allclose(first.train()(x), bn.train()(x))


def test_gradcheck_input_and_transition():
    first, second = _chain()
    x1 = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    x2 = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    a = second.transition.detach().clone().requires_grad_(True)

    def f(x2, a):
        one, two = copy.deepcopy(first), copy.deepcopy(second)
        clear_preceding()
        one.train()(x1)
        return functional_call(two, {"transition": a}, (x2,))

    assert torch.autograd.gradcheck(f, (x2, a))


def test_batch_two_digits_training_uses_the_chain_and_folds_exactly():
    clear_preceding()
    model = normsurgeon.convert(layers_train.cnn(), "bkn", input_shape=(2, 1, 16, 16)).model
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]
    layers_train.train(model, batch=2, steps=150, lr=0.02)
    x, y = layers_train._test()
    model.zero_grad()
    nn.functional.cross_entropy(model.train()(x[:2]), y[:2]).backward()
    assert layers[0].transition.grad is None  # 1 input channel: no 1-channel BKN precedes it
    # once the running estimates have warmed up, the preceding layer's estimate enters the prior
    assert all(m.transition.grad.abs().sum() > 0 for m in layers[1:])
    model = normsurgeon.recalibrate(model, "digits:train").model.eval()
    assert layers_train.accuracy(model) > 0.3  # chance is 0.1
    folded = normsurgeon.fold(copy.deepcopy(model), input_shape=(2, 1, 16, 16)).model
    assert not any(isinstance(m, BatchKalmanNorm) for m in folded.modules())
    with torch.no_grad():
        ref = model(x[:64])
        assert (folded(x[:64]) - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert torch.allclose(model(x[:1]), ref[:1], atol=1e-6)  # eval: batch-independent
