"""Batch Group Normalization against its formula; eval affine; running statistics per group."""
import torch

from normsurgeon.layers import BatchGroupNorm


def _layer(c=8, g=4):
    m = BatchGroupNorm(c, g).double()
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, c))
        m.bias.copy_(torch.linspace(-1.0, 1.0, c))
    return m


def test_train_forward_and_running_stats_match_formula():
    m = _layer()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64) * 2 + 0.5
    y = m.train()(x)
    for g in range(4):
        chunk = x[:, 2 * g:2 * g + 2]  # G divides C: group g is channels 2g, 2g+1
        mu, var = chunk.mean(), chunk.var(unbiased=False)
        ref = (chunk - mu) / torch.sqrt(var + 1e-5)
        ref = ref * m.weight[2 * g:2 * g + 2].view(1, -1, 1, 1) + m.bias[2 * g:2 * g + 2].view(1, -1, 1, 1)
        assert torch.allclose(y[:, 2 * g:2 * g + 2], ref)
        assert torch.allclose(m.running_mean[g], 0.1 * mu)
        assert torch.allclose(m.running_var[g], 0.9 + 0.1 * chunk.var(unbiased=True))


def test_more_groups_than_channels_split_positions():
    m = BatchGroupNorm(2, 4).double().train()
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    y = m(x)
    flat = x.reshape(2, 4, 2)  # chunk k: channel k // 2, positions (2k % 4, +1)
    ref = (flat - flat.mean(dim=(0, 2), keepdim=True)) / torch.sqrt(flat.var(dim=(0, 2), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(y, ref.reshape(x.shape))
    assert m.eval_affine() is None


def test_eval_affine_and_gradcheck():
    m = _layer()
    m.train()(torch.randn(4, 8, 3, 3, dtype=torch.float64))
    m.eval()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    s, t = m.eval_affine()
    assert torch.allclose(m(x), x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))
    m.train()
    xg = torch.randn(3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (xg,), eps=1e-6, atol=1e-6)
