"""The Four-Things generalized BN (ghost BN, batch+group, example weighting) against its formula."""
import torch

from normsurgeon.layers import GeneralizedBatchNorm, GhostBatchNorm


def _affine(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.num_features
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        m.running_sq_mean.copy_(m.running_mean ** 2 + torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return m


def _ref_group(x, idx_n, idx_c, w, b, eps=1e-5):
    block = x[idx_n][:, idx_c]
    mu, var = block.mean(), block.var(unbiased=False)
    return (block - mu) / torch.sqrt(var + eps) * w[idx_c].view(1, -1, 1, 1) + b[idx_c].view(1, -1, 1, 1)


def test_ghost_batches_and_whole_batch_moving_averages():
    m = _affine(GhostBatchNorm(4, virtual_batch=2).double())
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)  # 5 = 2 + 2 + 1: last ghost batch smaller
    rm, rs = m.running_mean.clone(), m.running_sq_mean.clone()
    y = m.train()(x)
    for ns in ([0, 1], [2, 3], [4]):
        for c in range(4):
            if len(ns) == 1:
                continue  # one sample: checked below through the mean
            assert torch.allclose(y[ns][:, [c]], _ref_group(x, ns, [c], m.weight, m.bias))
    assert torch.allclose(m.running_mean, 0.99 * rm + 0.01 * x.mean(dim=(0, 2, 3)))
    assert torch.allclose(m.running_sq_mean, 0.99 * rs + 0.01 * (x ** 2).mean(dim=(0, 2, 3)))


def test_batch_group_statistics_over_channel_groups_and_sample_pairs():
    m = _affine(GeneralizedBatchNorm(6, examples_per_group=2, channels_per_group=3).double())
    x = torch.randn(4, 6, 2, 2, dtype=torch.float64) * 2 + 1
    y = m.train()(x)
    for ns in ([0, 1], [2, 3]):
        for cs in ([0, 1, 2], [3, 4, 5]):
            assert torch.allclose(y[ns][:, cs], _ref_group(x, ns, cs, m.weight, m.bias))


def test_eval_example_weighting():
    alpha = 0.3
    m = _affine(GeneralizedBatchNorm(4, channels_per_group=2, alpha=alpha).double()).eval()
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    y = m(x)
    for n in range(3):
        for cs in ([0, 1], [2, 3]):
            ex_m, ex_s = x[n, cs].mean(), (x[n, cs] ** 2).mean()
            pm, ps = m.running_mean[cs].mean(), m.running_sq_mean[cs].mean()
            mean = (1 - alpha) * pm + alpha * ex_m
            var = (1 - alpha) * ps + alpha * ex_s - mean ** 2
            ref = (x[n, cs] - mean) / torch.sqrt(var + 1e-5) * m.weight[cs].view(-1, 1, 1) + m.bias[cs].view(-1, 1, 1)
            assert torch.allclose(y[n, cs], ref)
    assert m.eval_affine() is None
    assert torch.allclose(m(x[:1]), y[:1])  # batch-independent at eval


def test_alpha_zero_eval_is_constant_affine_and_equals_bn():
    m = _affine(GeneralizedBatchNorm(4).double()).eval()
    bn = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.weight.copy_(m.weight)
        bn.bias.copy_(m.bias)
        bn.running_mean.copy_(m.running_mean)
        bn.running_var.copy_(m.running_sq_mean - m.running_mean ** 2)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    s, t = m.eval_affine()
    assert torch.allclose(m(x), bn(x))
    assert torch.allclose(m(x), x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))


def test_gradcheck():
    for kw in ({"examples_per_group": 2}, {"examples_per_group": 2, "channels_per_group": 2}):
        m = _affine(GeneralizedBatchNorm(4, **kw).double()).train()
        x = torch.randn(4, 4, 2, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: m(t), (x,), eps=1e-6, atol=1e-6)
    m = _affine(GeneralizedBatchNorm(4, alpha=0.5).double()).eval()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,), eps=1e-6, atol=1e-6)
