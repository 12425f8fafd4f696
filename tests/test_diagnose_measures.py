"""Each diagnose measure against a direct computation on small tensors."""
import math

import pytest
import torch

from normsurgeon.diagnosis import measures as M


def pooled(y: torch.Tensor):
    """Per-channel mean, E[y^2] and population variance over samples and positions, directly."""
    v = y.double().transpose(0, 1).reshape(y.shape[1], -1)
    return v.mean(1), (v * v).mean(1), v.var(1, unbiased=False)


def test_constant_channel_has_collapse_one():
    y = torch.ones(5, 3, 4, 4) * torch.tensor([2.0, -1.0, 0.5]).reshape(1, 3, 1, 1)
    mean, sq, var = pooled(y)
    assert M.collapse(mean, sq) == pytest.approx(1.0, abs=1e-12)
    assert M.flat_fraction(var, sq) == 1.0
    assert M.dead_fraction(sq) == 0.0


def test_zero_mean_channels_have_collapse_zero_and_mixed_case_matches_formula():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 4, 5, 5, generator=g, dtype=torch.float64)
    y = y - y.mean(dim=(0, 2, 3), keepdim=True)
    mean, sq, _ = pooled(y)
    assert M.collapse(mean, sq) == pytest.approx(0.0, abs=1e-12)
    z = y + torch.tensor([3.0, 0.0, -1.0, 0.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    mean, sq, _ = pooled(z)
    direct = sum(float(z[:, c].mean()) ** 2 for c in range(4)) / sum(float((z[:, c] ** 2).mean()) for c in range(4))
    assert M.collapse(mean, sq) == pytest.approx(direct, rel=1e-12)


def test_dead_and_flat_fractions_count_channels():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(8, 4, 3, 3, generator=g).relu()
    y[:, 1] = 0.0  # dead
    y[:, 2] = 0.7  # constant, alive
    mean, sq, var = pooled(y)
    assert M.dead_fraction(sq) == 0.25
    assert M.flat_fraction(var, sq) == 0.5
    assert M.dead_fraction(torch.zeros(3, dtype=torch.float64)) == 1.0


def test_identical_samples_have_instance_variability_zero():
    g = torch.Generator().manual_seed(2)
    one = torch.randn(1, 3, 6, 6, generator=g)
    y = one.expand(10, -1, -1, -1)
    m, s = M.per_sample_stats(y)
    _, _, var = pooled(y)
    iv_mean, iv_std = M.instance_variability(m.var(0, unbiased=False), s.var(0, unbiased=False), var)
    assert iv_mean == pytest.approx(0.0, abs=1e-12) and iv_std == pytest.approx(0.0, abs=1e-12)
    assert float(var.sum()) > 0


def test_instance_variability_matches_law_of_total_variance():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64) + torch.randn(12, 2, 1, 1, generator=g,
                                                                                dtype=torch.float64) * 2
    m, s = M.per_sample_stats(y)
    assert torch.allclose(m, y.mean(dim=(2, 3)))
    assert torch.allclose(s, y.reshape(12, 2, -1).std(dim=2, unbiased=False))
    _, _, var = pooled(y)
    iv_mean, iv_std = M.instance_variability(m.var(0, unbiased=False), s.var(0, unbiased=False), var)
    between = sum(float(y[:, c].mean(dim=(1, 2)).var(unbiased=False)) for c in range(2))
    total = sum(float(y[:, c].var(unbiased=False)) for c in range(2))
    assert iv_mean == pytest.approx(between / total, rel=1e-12)
    within = sum(float((y[:, c].reshape(12, -1).var(1, unbiased=False)).mean()) for c in range(2))
    assert between + within == pytest.approx(total, rel=1e-12)  # the split the measure rests on
    assert 0 < iv_mean < 1 and iv_std > 0


def test_matching_statistics_have_staleness_zero_and_offsets_match_formula():
    mean = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    var = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    shift, lv = M.staleness(mean, var, mean.float(), var.float(), eps=1e-5)
    assert float(shift.abs().max()) < 1e-7 and float(lv.abs().max()) < 1e-7
    shift, lv = M.staleness(mean + torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), var * 2, mean, var, eps=0.0)
    assert shift.tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert lv.tolist() == pytest.approx([math.log(2)] * 3)


def _cka_direct(x, y):
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / (k.norm() * l.norm()))


@pytest.mark.parametrize("n,cx,cy", [(40, 3, 5), (6, 8, 4)])  # both forms (feature / sample space)
def test_linear_cka_matches_centered_gram_formula(n, cx, cy):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, cx, generator=g, dtype=torch.float64)
    y = torch.randn(n, cy, generator=g, dtype=torch.float64) + x[:, :1]
    assert M.linear_cka(x, y) == pytest.approx(_cka_direct(x, y), rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(cx, cx, generator=g, dtype=torch.float64))
    assert M.linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, rel=1e-10)  # rotation, scale, shift


def test_mean_cosine():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert M.mean_cosine(x, y) == pytest.approx(0.5)
    assert M.mean_cosine(x, torch.ones(2, 3)) is None
