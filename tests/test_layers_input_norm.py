"""Online input normalization and the recalibration protocol shared by the running-estimate layers."""
import pytest
import torch

from normsurgeon.layers import (BatchGroupNorm, EstimatedBatchNorm, GeneralizedBatchNorm, GhostBatchNorm,
                                InputNorm)


def test_input_norm_init_and_frozen_shift():
    m = InputNorm(3)
    assert torch.allclose(m.weight, torch.full((3,), 0.058))
    assert "bias" not in dict(m.named_parameters()) and torch.equal(m.bias, torch.zeros(3))
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    y = m.train()(x)
    ref = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(y, 0.058 * ref, atol=1e-6)
    m.eval()
    s, t = m.eval_affine()
    assert torch.allclose(m(x), x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), atol=1e-6)


LAYERS = [
    lambda: EstimatedBatchNorm(4),
    lambda: BatchGroupNorm(4, 2),
    lambda: GeneralizedBatchNorm(4, channels_per_group=2),
    lambda: GhostBatchNorm(4, 2),
    lambda: InputNorm(4),
]


@pytest.mark.parametrize("make", LAYERS)
def test_load_moments_from_pooled_batches_gives_population_statistics(make):
    layer = make().double()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    sums = [layer.batch_moments(b) for b in batches]
    count = sum(s[2] for s in sums)
    mean = sum(s[0] for s in sums) / count
    sq = sum(s[1] for s in sums) / count
    layer.load_moments(mean, sq, count)
    data = layer.stat_view(torch.cat(batches))
    axes = layer.moment_axes(data)
    ref_mean = data.mean(dim=axes)
    ref_var = data.var(dim=axes, unbiased=False)
    if hasattr(layer, "running_var"):
        assert torch.allclose(layer.running_mean, ref_mean) and torch.allclose(layer.running_var, ref_var)
    else:
        assert torch.allclose(layer.running_mean, ref_mean)
        assert torch.allclose(layer.running_sq_mean - layer.running_mean ** 2, ref_var)
    layer.reset_running_stats()
    assert torch.all(layer.running_mean == 0)
