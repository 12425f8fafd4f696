"""moment_sums: every layout path against a float64 reference computed independently."""
import pytest
import torch

from normsurgeon.layers.moments import moment_sums


def reference(x: torch.Tensor):
    v = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return v.sum(1), (v * v).sum(1), v.shape[1]


CASES = {
    "long rows (4d, 16x16)": (8, 5, 16, 16),
    "short rows (4d, 2x2)": (32, 12, 2, 2),
    "one position per sample": (6, 3, 1, 1),
    "bn1d (n, c)": (64, 7),
    "bn1d (n, c, l)": (9, 4, 100),
    "bn3d": (3, 6, 4, 5, 6),
    "big batch, short rows": (300, 4, 3, 3),
}


@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_float32_sums_match_float64_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 2
    s, s2, n = moment_sums(x)
    rs, rs2, rn = reference(x)
    assert n == rn and s.dtype == torch.float64 and s.shape == (shape[1],)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=1e-6 * rn)
    torch.testing.assert_close(s2, rs2, rtol=1e-6, atol=0)


def test_float64_input_is_exact_to_float64_rounding():
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64) + 10
    s, s2, _ = moment_sums(x)
    rs, rs2, _ = reference(x)
    torch.testing.assert_close(s, rs, rtol=1e-13, atol=0)
    torch.testing.assert_close(s2, rs2, rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 6, 2, 2)])
def test_channels_last_equals_contiguous(shape):
    x = torch.randn(shape) * 2 - 1
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    a, b = moment_sums(x), moment_sums(cl)
    assert a[2] == b[2]
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_does_not_overflow(dtype):
    """300 values of ~200 each: the sum of squares (1.2e7) overflows float16's 65504."""
    x = (torch.rand(3, 2, 10, 10) * 50 + 175).to(dtype)
    s, s2, _ = moment_sums(x)
    rs, rs2, _ = reference(x)
    assert torch.isfinite(s2).all()
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    torch.testing.assert_close(s2, rs2, rtol=1e-6, atol=0)


def test_autograd_input_is_not_tracked():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    s, s2, _ = moment_sums(x * 2)
    assert not s.requires_grad and not s2.requires_grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "short rows"])
def test_large_mean_small_spread_keeps_its_variance(layout):
    """One channel near 0, one at 1000 with spread 1, one at -1e3 with spread 0.1: the variance from
    the sums must hold to 1e-5 against float64 (raw float32 sums of squares are ~10% off here)."""
    g = torch.Generator().manual_seed(9)
    hw = 2 if layout == "short rows" else 14
    x = torch.randn(64 if layout == "short rows" else 16, 3, hw, hw, generator=g) \
        * torch.tensor([1.0, 1.0, 0.1]).view(1, 3, 1, 1) + torch.tensor([0.0, 1000.0, -1000.0]).view(1, 3, 1, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    s, s2, n = moment_sums(x)
    rs, rs2, rn = reference(x)
    var = s2 / n - (s / n) ** 2
    rvar = rs2 / rn - (rs / rn) ** 2
    torch.testing.assert_close(var, rvar, rtol=1e-5, atol=0)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=1e-3)
    naive = (x.transpose(0, 1).reshape(3, -1) ** 2).sum(1, dtype=torch.float32).double() / n - (s / n) ** 2
    assert (naive[1:] - rvar[1:]).abs().max() > 0.01  # the test can fail: the naive way is far off


def test_non_finite_values_pass_through():
    x = torch.randn(4, 2, 3, 3)
    x[1, 0, 2, 2] = float("nan")
    s, s2, _ = moment_sums(x)
    assert torch.isnan(s[0]) and torch.isnan(s2[0]) and torch.isfinite(s[1]) and torch.isfinite(s2[1])
