"""The recalibration protocol: normsurgeon's recipe layers and any module exposing it."""
import torch
from torch import nn

import normsurgeon
from normsurgeon.layers import BatchGroupNorm, EstimatedBatchNorm, GhostBatchNorm, InputNorm


def _pool(xs, view):
    v = torch.cat([view(t).transpose(0, 1).reshape(view(t).shape[1], -1) for t in xs], dim=1)
    return v.mean(1), (v * v).mean(1)


def test_recipe_layers_get_exact_pooled_moments():
    torch.manual_seed(0)
    inorm, c1, bgn, c2, ghost, c3, est = (InputNorm(3), nn.Conv2d(3, 8, 3), BatchGroupNorm(8, 4), nn.Conv2d(8, 8, 1),
                                         GhostBatchNorm(8, virtual_batch=2), nn.Conv2d(8, 4, 1), EstimatedBatchNorm(4))
    net = nn.Sequential(inorm, c1, bgn, nn.ReLU(), c2, ghost, nn.ReLU(), c3, est).double().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 1.5 + 0.7
    res = normsurgeon.recalibrate(net, x, batch_size=4, shuffle=False)
    assert res.count("recalibrated") == 4

    # independent forward: every layer normalizes each batch with that batch's own statistics
    def bn(h, groups=None):
        v = h.reshape(h.shape[0], groups, -1) if groups else h
        dims = [d for d in range(v.dim()) if d != 1]
        m, var = v.mean(dims, keepdim=True), v.var(dims, unbiased=False, keepdim=True)
        return ((v - m) / torch.sqrt(var + 1e-5)).reshape(h.shape)

    ch = lambda p: p.reshape(1, -1, 1, 1)
    seen = {k: [] for k in ("in", "bgn", "ghost", "est")}
    with torch.no_grad():
        for s in (0, 4):
            h = x[s:s + 4]
            seen["in"].append(h)
            h = c1(bn(h) * ch(inorm.weight) + ch(inorm.bias))
            seen["bgn"].append(h)
            h = c2(torch.relu(bn(h, 4) * ch(bgn.weight) + ch(bgn.bias)))
            seen["ghost"].append(h)
            h = c3(torch.relu(bn(h) * ch(ghost.weight) + ch(ghost.bias)))
            seen["est"].append(h)
    m = res.model
    for key, layer, view in (("in", m[0], lambda t: t), ("bgn", m[2], lambda t: t.reshape(t.shape[0], 4, -1)),
                             ("est", m[8], lambda t: t)):
        mean, sq = _pool(seen[key], view)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.running_var, sq - mean * mean, rtol=1e-9, atol=1e-12)
    mean, sq = _pool(seen["ghost"], lambda t: t)  # ghost stores E[x] and E[x^2]
    torch.testing.assert_close(m[5].running_mean, mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m[5].running_sq_mean, sq, rtol=1e-9, atol=1e-12)
    # nothing but running statistics changed
    for k, v in m.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "running_sq_mean")):
            assert torch.equal(v, before[k]), k


class Toy(nn.Module):
    """Not a normsurgeon layer: it only exposes the protocol (per-channel scale from E[x^2])."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("rms", torch.ones(c))
        self.loaded = None

    def reset_running_stats(self):
        self.rms.fill_(1.0)

    def batch_moments(self, x):
        v = x.double().transpose(0, 1).reshape(x.shape[1], -1)
        return v.sum(1), (v * v).sum(1), v.shape[1]

    def load_moments(self, mean, sq_mean, count):
        self.rms.copy_(sq_mean.sqrt())
        self.loaded = count

    def forward(self, x):
        return x / self.rms.reshape(1, -1, 1, 1)


def test_any_module_with_the_protocol_is_recalibrated():
    net = nn.Sequential(nn.Conv2d(2, 3, 1), Toy(3)).eval()
    x = torch.randn(6, 2, 4, 4)
    res = normsurgeon.recalibrate(net, x, batch_size=3)
    with torch.no_grad():
        h = net[0](x).double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(res.model[1].rms, (h * h).mean(1).sqrt().float(), rtol=1e-6, atol=1e-7)
    assert res.model[1].loaded == 6 * 16
