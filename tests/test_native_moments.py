"""The one-pass C moments kernel against float64 sums computed independently, its refusals, and the
build's fallbacks. Skipped where no C compiler exists (the torch path then serves; other tests cover it)."""
import os
import subprocess
import sys

import pytest
import torch

from normsurgeon.native import build
from normsurgeon.native import moments as native

pytestmark = pytest.mark.skipif(native.kernel() is None, reason=f"no native kernel here: {native.why_not()}")


def reference(x: torch.Tensor):
    v = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return v.sum(1), (v * v).sum(1), v.mean(1), v.var(1, unbiased=False)


def run_kernel(x: torch.Tensor, calls: int = 1):
    c = x.shape[1]
    s, s2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    mean, var = torch.full((c,), float("nan")), torch.full((c,), float("nan"))
    sums = native.ChannelSums(s, s2, mean, var)
    counts = [sums(x) for _ in range(calls)]
    return s, s2, mean, var, counts


SHAPES = {
    "bn1d (n, c)": (64, 17),
    "bn1d, one sample": (1, 5),
    "hw 2": (7, 3, 2),
    "2x2 maps": (33, 12, 2, 2),
    "7x7 maps (tail of 1)": (9, 6, 7, 7),
    "16x16 maps": (8, 5, 16, 16),
    "hw 511": (3, 4, 511),
    "hw 512": (3, 4, 512),
    "hw 513": (3, 4, 513),
    "hw 9000 (flushes within a row)": (2, 3, 9000),
    "bn3d": (3, 6, 4, 5, 6),
    "one channel": (40, 1, 9, 9),
    "parallel, rows split mid-sample": (5, 7, 61, 43),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_sums_mean_var_match_float64_reference(shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(sum(shape))
        x = torch.randn(shape, generator=g) * 3 + 2
        s, s2, mean, var, counts = run_kernel(x, calls=2)
    finally:
        torch.set_num_threads(before)
    rs, rs2, rmean, rvar = reference(x)
    per = x.numel() // x.shape[1]
    assert counts == [per, per]
    torch.testing.assert_close(s, 2 * rs, rtol=1e-6, atol=1e-6 * per)
    torch.testing.assert_close(s2, 2 * rs2, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, rmean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, rvar.float(), rtol=1e-5, atol=1e-6)


def test_thread_counts_agree_and_runs_repeat_exactly():
    x = torch.randn(6, 11, 37, 29) * 5
    out = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out.setdefault(threads, []).append(run_kernel(x)[:2])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out[1][0], out[1][1]))  # deterministic
    torch.testing.assert_close(out[1][0][0], out[2][0][0], rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(out[1][0][1], out[2][0][1], rtol=1e-6, atol=0)


def test_unaligned_view_and_non_finite_values():
    big = torch.randn(1 + 4 * 3 * 50)
    x = big[1:].view(4, 3, 50)  # contiguous, but one float off the allocation's alignment
    s, s2, *_ = run_kernel(x)
    rs, rs2, *_ = reference(x)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(s2, rs2, rtol=1e-6, atol=0)
    x = torch.randn(4, 3, 50)
    x[2, 1, 7] = float("nan")
    x[0, 2, 3] = float("inf")
    s, s2, mean, var, _ = run_kernel(x)
    assert torch.isnan(s[1]) and torch.isnan(var[1]) and torch.isnan(mean[1])  # NaN is never clamped away
    assert not torch.isfinite(s2[2]) and not torch.isfinite(var[2])
    assert torch.isfinite(s[0]) and torch.isfinite(var[0])


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 3, 5, 5, dtype=torch.float64),
    lambda: torch.randn(4, 3, 5, 5).half(),
    lambda: torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last),
    lambda: torch.randn(4, 3, 5, 5)[:, :, ::2],
    lambda: torch.randn(4, 2, 5, 5),  # wrong channel count
    lambda: torch.randn(0, 3, 5, 5),
    lambda: torch.randn(3),
], ids=["float64", "float16", "channels_last", "strided", "channels", "empty", "1-d"])
def test_refuses_what_it_cannot_take_and_touches_nothing(make):
    s, s2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    mean = torch.full((3,), 7.0)
    assert native.ChannelSums(s, s2, mean)(make()) == 0
    assert not s.any() and not s2.any() and torch.equal(mean, torch.full((3,), 7.0))


def test_accumulators_of_the_wrong_kind_are_rejected_up_front():
    with pytest.raises(ValueError):
        native.ChannelSums(torch.zeros(3), torch.zeros(3))  # float32 accumulators
    with pytest.raises(ValueError):
        native.ChannelSums(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(4))


def test_torch_only_turns_the_kernel_off_and_back_on():
    s, s2 = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    sums = native.ChannelSums(s, s2)
    with native.torch_only():
        assert sums(torch.randn(3, 2)) == 0 and "turned off" in native.why_not()
    assert sums(torch.randn(3, 2)) == 3 and native.why_not() == ""


def _probe(env: dict, cache) -> list[str]:
    """``[kernel available, why_not]`` from a fresh interpreter with ``env`` added."""
    code = ("from normsurgeon.native import moments as m; print(m.kernel() is not None); print(m.why_not())")
    full = {**os.environ, "NORMSURGEON_CACHE": str(cache), **env}
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("env, says", [
    ({"NORMSURGEON_NATIVE": "0"}, "disabled by NORMSURGEON_NATIVE=0"),
    ({"CC": "/bin/false"}, "could not build moments.c"),
    ({"CC": "/no/such/compiler"}, "CC='/no/such/compiler' is not an executable compiler"),
    ({"CC": "", "PATH": "/nonexistent"}, "no C compiler found"),
])
def test_build_falls_back_with_a_reason(tmp_path, env, says):
    available, reason = _probe(env, tmp_path / "cache")
    assert available == "False" and says in reason
    assert not list((tmp_path / "cache").glob("*.so"))


def test_cc_may_hold_words(tmp_path):
    """CC="gcc -DWHATEVER" (or "ccache gcc"): the first word is the program, the rest its arguments."""
    cc = build.compiler()
    assert cc is not None
    assert _probe({"CC": f"{cc[0]} -DNORMSURGEON_TEST=1"}, tmp_path / "cache") == ["True", ""]


def test_build_is_cached_and_keyed_by_source(tmp_path):
    cache = tmp_path / "cache"
    assert _probe({}, cache)[0] == "True"
    built = sorted(cache.glob("moments-*"))
    assert len(built) == 1 and not list(cache.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    assert _probe({}, cache)[0] == "True"  # second process: loads the cached file, builds nothing
    assert sorted(cache.glob("moments-*")) == built and built[0].stat().st_mtime_ns == stamp
    assert build.cache_dir() != cache  # this process still uses its own cache setting


def test_processes_building_at_once_all_get_the_kernel(tmp_path):
    cache = tmp_path / "cache"
    code = "from normsurgeon.native import moments as m; print(m.kernel() is not None)"
    env = {**os.environ, "NORMSURGEON_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outs == ["True"] * 3 and len(list(cache.glob("moments-*.so"))) == 1


@pytest.mark.parametrize("shape", [(4096, 2, 8, 8), (64, 2, 128, 128)], ids=["short rows", "long rows"])
def test_long_channels_with_a_large_mean_stay_accurate(shape):
    """2^18-2^20 values of ~1000 per channel: float lanes must be flushed to double as they fill, or
    the float32 partial sums lose digits (this fails when flushing is removed)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g) + 1000
    s, s2, mean, var, _ = run_kernel(x)
    rs, rs2, rmean, rvar = reference(x)
    torch.testing.assert_close(s, rs, rtol=2e-7, atol=0)
    torch.testing.assert_close(s2, rs2, rtol=2e-7, atol=0)


def test_a_cached_library_others_may_write_is_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    assert _probe({}, cache)[0] == "True"
    (built,) = cache.glob("moments-*.so")
    built.chmod(0o777)  # group/world-writable: anyone could have swapped in other code
    available, reason = _probe({}, cache)
    assert available == "False" and "writable by others: not loading it" in reason


def test_unbalanced_quotes_in_cc_fall_back(tmp_path):
    available, reason = _probe({"CC": "gcc '-O2"}, tmp_path / "cache")
    assert available == "False" and "is not an executable compiler" in reason
