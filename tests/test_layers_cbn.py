"""Cross-iteration BN: the pooled, Taylor-compensated statistics against an independent float64
computation (analytic d mu / d W from unfolded patches), gradcheck, micro-batch training, fold."""
import copy
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon
from normsurgeon.layers import CrossIterationBatchNorm
from tests import layers_train


def _pair(window=3, burnin=0, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False).double()
    cbn = CrossIterationBatchNorm(4, window=window, burnin=burnin).double().attach(conv)
    with torch.no_grad():
        cbn.weight.copy_(torch.rand(4) + 0.5)
        cbn.bias.copy_(torch.randn(4))
    return conv, cbn


def _stats_and_grads(conv, x):
    """mu, E[y^2] per channel and their derivatives w.r.t. each filter, from unfolded patches."""
    w = conv.weight.detach()
    patches = F.unfold(x, 3, padding=1)  # (N, 18, P)
    y = torch.einsum("ck,nkp->ncp", w.reshape(4, -1), patches)
    mu = y.mean(dim=(0, 2))
    nu = (y * y).mean(dim=(0, 2))
    dmu = patches.mean(dim=(0, 2)).expand(4, -1)  # d mu_c / d W_c = E[patch]
    dnu = 2 * torch.einsum("ncp,nkp->ck", y, patches) / (y.shape[0] * y.shape[2])  # 2 E[y_c patch]
    return mu, nu, dmu, dnu, w.reshape(4, -1).clone(), y


def test_pooled_statistics_match_independent_taylor_compensation():
    conv, cbn = _pair(window=3)
    xs = [torch.randn(2, 2, 5, 5, dtype=torch.float64) * (1 + i) + i for i in range(3)]
    history = []
    for i, x in enumerate(xs):
        out = cbn.train()(conv(x))
        history.insert(0, _stats_and_grads(conv, x))
        if i < 2:
            with torch.no_grad():  # a weight change between iterations, as an optimizer step would make
                conv.weight.add_(0.05 * torch.randn_like(conv.weight))
    w_now = conv.weight.detach().reshape(4, -1)
    mus, nus = [], []
    for j, (mu, nu, dmu, dnu, w_then, _) in enumerate(history):
        m = mu + (dmu * (w_now - w_then)).sum(1)
        n = nu + (dnu * (w_now - w_then)).sum(1)
        mus.append(m)
        nus.append(torch.maximum(n, m * m) if j else n)
    mean = torch.stack(mus).mean(0)
    var = torch.stack(nus).mean(0) - mean ** 2
    y = history[0][5].reshape(2, 4, 5, 5)
    ref = (y - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    ref = ref * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, ref, atol=1e-10)
    # the compensation matters here: the uncompensated average differs
    plain = torch.stack([h[0] for h in history]).mean(0)
    assert (plain - mean).abs().max() > 1e-3


def test_burnin_is_plain_batch_norm_and_running_stats_follow_pooled_statistics():
    conv, cbn = _pair(window=4, burnin=2)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(cbn.weight)
        bn.bias.copy_(cbn.bias)
    for _ in range(2):
        x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
        y = conv(x)
        assert torch.allclose(cbn.train()(y), bn.train()(y))
    assert len(cbn._store) == 0  # nothing stored during burn-in


def test_gradcheck_through_the_window():
    conv, cbn = _pair(window=3)
    for _ in range(3):  # fill the store
        cbn.train()(conv(torch.randn(2, 2, 4, 4, dtype=torch.float64)))
        with torch.no_grad():
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))
    saved = list(cbn._store)
    calls = int(cbn.num_batches_tracked)

    def f(x):
        cbn._store = deque(saved, maxlen=cbn._store.maxlen)
        cbn.num_batches_tracked.fill_(calls)
        return cbn(conv(x))

    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))


def test_eval_is_the_running_affine_batch_independent():
    _, cbn = _pair()
    with torch.no_grad():
        cbn.running_mean.copy_(torch.randn(4, dtype=torch.float64))
        cbn.running_var.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    y = cbn.eval()(x)
    assert torch.allclose(y[:1], cbn(x[:1]))
    s, t = cbn.eval_affine()
    assert torch.allclose(y, x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))


def test_batch_two_digits_training_recalibrate_then_exact_fold():
    model = normsurgeon.convert(layers_train.cnn(), "cbn:4", input_shape=(2, 1, 16, 16), cbn_burnin=10).model
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm)]
    assert len(layers) == 3 and all(m.producer is not None for m in layers)
    layers_train.train(model, batch=2, steps=150, lr=0.006)
    assert all(len(m._store) == 3 for m in layers)  # the window filled after burn-in
    res = normsurgeon.recalibrate(model, "digits:train")  # running estimates: the recalibration protocol
    assert [c.action for c in res.changes if c.target in ("1", "5", "9")] == ["recalibrated"] * 3
    assert layers_train.accuracy(res.model) > 0.3  # chance is 0.1; 150 steps at batch 2
    model = res.model.eval()
    x = layers_train.test_x()[:64]
    folded = normsurgeon.fold(copy.deepcopy(model), input_shape=(2, 1, 16, 16)).model
    assert not any(isinstance(m, CrossIterationBatchNorm) for m in folded.modules())
    with torch.no_grad():
        ref = model(x)
        assert (folded(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
