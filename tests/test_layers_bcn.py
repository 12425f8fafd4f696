"""Batch-Channel Normalization: both parts against their formulas, EstBN updates, gradients."""
import torch

from normsurgeon.layers import BatchChannelNorm, ChannelGroupNorm, EstimatedBatchNorm


def _bn(c=8, estimate=True, rate=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = EstimatedBatchNorm(c, estimate=estimate, rate=rate).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def test_estbn_updates_then_normalizes_with_estimates():
    bn = _bn()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64) * 2 + 1
    old_m, old_v = bn.running_mean.clone(), bn.running_var.clone()
    y = bn.train()(x)
    xt = x.transpose(0, 1).reshape(8, -1)
    new_m = 0.75 * old_m + 0.25 * xt.mean(1)
    new_v = 0.75 * old_v + 0.25 * ((xt - old_m[:, None]) ** 2).mean(1)  # centred on the OLD mean
    assert torch.allclose(bn.running_mean, new_m) and torch.allclose(bn.running_var, new_v)
    ref = (x - new_m.view(1, -1, 1, 1)) / torch.sqrt(new_v.view(1, -1, 1, 1) + 1e-5)
    ref = ref * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(y, ref)


def test_large_batch_form_uses_batch_statistics():
    bn = _bn(estimate=False)
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    y = bn.train()(x)
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(y, ref)


def test_channel_part_is_group_norm_with_per_group_affine():
    cn = ChannelGroupNorm(4, 8).double()
    with torch.no_grad():
        cn.weight.copy_(torch.tensor([0.5, 1.5, 2.0, -1.0]))
        cn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64) * 3 + 2
    v = x.reshape(2, 4, -1)
    ref = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ref = (ref * cn.weight.view(1, 4, 1) + cn.bias.view(1, 4, 1)).reshape(x.shape)
    assert torch.allclose(cn(x), ref)
    w, b = cn.per_channel_affine()
    gn = torch.nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        gn.weight.copy_(w)
        gn.bias.copy_(b)
    assert torch.allclose(gn(x), cn(x))


def test_bcn_eval_is_bn_affine_then_channel_norm_and_batch_independent():
    bcn = BatchChannelNorm(_bn(), ChannelGroupNorm(2, 8).double()).eval()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    s, t = bcn.bn.eval_affine()
    assert torch.allclose(bcn(x), bcn.cn(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1)))
    assert torch.allclose(bcn(x[:1]), bcn(x)[:1])


def test_gradcheck():
    torch.manual_seed(0)
    for estimate in (True, False):
        bcn = BatchChannelNorm(_bn(c=4, estimate=estimate, rate=0.0), ChannelGroupNorm(2, 4).double()).train()
        x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: bcn(t), (x,), eps=1e-6, atol=1e-6)
