"""The diagnose pass: hooks see every norm layer and the block after it; pooled figures equal a
direct computation over the whole data; teacher matching; verdicts."""
import copy
import json

import pytest
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.diagnosis import measures as M
from normsurgeon.diagnosis.sites import find_sites
from normsurgeon.layers import ProxyNorm
from tests.util import randomize_norm_stats


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.GroupNorm(1, 5), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()


def data(n=23, seed=0):
    return torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def test_pooled_figures_equal_direct_computation_and_do_not_depend_on_batch_size():
    model = randomize_norm_stats(small_cnn())
    x = data()
    rows = ns.diagnose(model, x, batch_size=5).layers
    again = ns.diagnose(model, x, batch_size=23).layers
    for a, b in zip(rows, again):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], rel=1e-6, abs=1e-9), k  # float32 partials, float64 pooling
    with torch.no_grad():
        c1 = model[0](x)
        y1 = model[1](c1)
        a1 = torch.relu(y1)
        y2 = model[4](model[3](a1))
        a2 = torch.nn.functional.gelu(y2)
    bn = model[1]
    mean_d, _, var_d = _pooled(c1)
    shift, lv = M.staleness(mean_d, var_d, bn.running_mean, bn.running_var, bn.eps)
    r1, r2 = rows
    assert (r1["name"], r1["activation"], r2["name"], r2["activation"]) == ("1", "ReLU", "4", "GELU")
    assert r1["shift_max"] == pytest.approx(float(shift.max()), rel=1e-4)
    assert r1["log_var_max"] == pytest.approx(float(lv[lv.abs().argmax()]), rel=1e-4)
    assert r2["shift_max"] is None  # GroupNorm keeps no running statistics
    for row, y, a in ((r1, y1, a1), (r2, y2, a2)):
        m_a, sq_a, _ = _pooled(a)
        m_y, sq_y, var_y = _pooled(y)
        assert row["collapse"] == pytest.approx(float((m_a ** 2).sum() / sq_a.sum()), rel=1e-4)
        assert row["collapse_pre"] == pytest.approx(float((m_y ** 2).sum() / sq_y.sum()), rel=1e-4)
        per = y.double().mean(dim=(2, 3))
        assert row["instance_mean"] == pytest.approx(float(per.var(0, unbiased=False).sum() / var_y.sum()), rel=1e-4)


def _pooled(y):
    v = y.double().transpose(0, 1).reshape(y.shape[1], -1)
    return v.mean(1), (v * v).mean(1), v.var(1, unbiased=False)


def test_running_stats_set_to_the_data_statistics_are_not_stale():
    model = small_cnn()
    x = data()
    with torch.no_grad():
        c1 = model[0](x)
    mean, _, var = _pooled(c1)
    model[1].running_mean.copy_(mean)
    model[1].running_var.copy_(var)
    row = ns.diagnose(model, x).layers[0]
    assert abs(row["shift_max"]) < 1e-5 and abs(row["log_var_max"]) < 1e-5
    assert row["verdict"] == "ok"
    model[1].running_var.mul_(4.0)
    row = ns.diagnose(model, x).layers[0]
    assert row["log_var_max"] == pytest.approx(-torch.log(torch.tensor(4.0)).item(), rel=1e-3)
    assert row["verdict"] == "recalibrate"


def test_dead_layer_verdict_and_input_model_untouched():
    model = small_cnn()
    with torch.no_grad():
        model[1].bias.fill_(-100.0)  # every ReLU output is 0
    before = copy.deepcopy(model.state_dict())
    rows = ns.diagnose(model, data()).layers
    assert rows[0]["dead"] == 1.0 and rows[0]["verdict"] == "dead"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_teacher_identical_model_has_cka_one_and_perturbed_layer_drops():
    model = small_cnn()
    x = data(40)
    same = ns.diagnose(model, x, teacher=copy.deepcopy(model)).layers
    assert [r["teacher_layer"] for r in same] == ["1", "4"]
    assert all(r["cka"] == pytest.approx(1.0, abs=1e-9) and r["cosine"] == pytest.approx(1.0, abs=1e-9) for r in same)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[3].weight.copy_(torch.randn_like(other[3].weight))
    rows = ns.diagnose(other, x, teacher=model).layers
    assert rows[0]["cka"] == pytest.approx(1.0, abs=1e-9) and rows[1]["cka"] < 0.99
    # matched by order when names differ
    wrapped = nn.Sequential()
    wrapped.add_module("body", copy.deepcopy(model))
    rows = ns.diagnose(wrapped, x, teacher=model).layers
    assert [r["teacher_layer"] for r in rows] == ["1", "4"] and rows[1]["cka"] == pytest.approx(1.0, abs=1e-9)


def test_noise_fixed_instance_changes_statistics_and_is_reproducible():
    model = randomize_norm_stats(small_cnn())
    x = data()
    a = ns.diagnose(model, x, noise="weight:0.2", noise_seed=3).layers
    b = ns.diagnose(model, x, noise="weight:0.2", noise_seed=3).layers
    clean = ns.diagnose(model, x).layers
    assert a == b and a[0]["shift_max"] != clean[0]["shift_max"]
    r = ns.diagnose(model, x, noise="weight:0.2", noise_mode="resample", noise_samples=2, teacher=model)
    assert r.info["noise_samples"] == 2 and r.layers[0]["cka"] is not None


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.drop = nn.Dropout(0.1)
        self.act = nn.SiLU()

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: fx cannot trace this
            x = self.conv(x)
        return self.act(self.drop(self.norm(x)))


class OddName(nn.Module):
    """Not a torch norm, but it has the recalibration protocol: a norm layer for diagnose."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return (x - self.running_mean[None, :, None, None]) / self.running_var[None, :, None, None].sqrt()

    def reset_running_stats(self):
        pass

    def batch_moments(self, x):
        from normsurgeon.layers.moments import moment_sums
        return moment_sums(x)

    def load_moments(self, mean, sq_mean, count):
        pass


def test_sites_found_by_type_with_fallback_order_when_fx_fails():
    sites, how = find_sites(Untraceable())
    assert how.startswith("module order") and [(s.name, s.activation) for s in sites] == [("norm", "SiLU")]
    model = nn.Sequential(nn.Conv2d(2, 3, 1), OddName(3), nn.ReLU6(), nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 6, 6]))
    sites, how = find_sites(model)
    assert how == "fx graph" and [(s.name, s.activation) for s in sites] == [("1", "ReLU6"), ("4", "-")]
    rows = ns.diagnose(model, data()).layers
    assert rows[0]["shift_max"] is not None and rows[1]["shift_max"] is None
    rows = ns.diagnose(Untraceable(), data()).layers
    assert rows[0]["instance_mean"] == pytest.approx(0.0, abs=1e-9)  # IN (affine at init) pins per-sample means


def test_proxy_norm_joins_the_block_after_the_activation():
    model = ns.convert(small_cnn(), "ln+pn", input_shape=(2, 2, 6, 6)).model.eval()
    sites, _ = find_sites(model)
    assert sites[0].activation == "ReLU+ProxyNorm"
    x = data()
    row = ns.diagnose(model, x).layers[0]
    pn = next(m for m in model.modules() if isinstance(m, ProxyNorm))
    with torch.no_grad():
        a = pn(torch.relu(model.get_submodule("1")(model.get_submodule("0")(x))))
    m, sq, _ = _pooled(a)
    assert row["collapse"] == pytest.approx(float((m ** 2).sum() / sq.sum()), rel=1e-4)


def test_json_report_shape():
    r = ns.diagnose(small_cnn(), data())
    rep = json.loads(r.to_json())
    assert rep == json.loads(json.dumps(r.report, default=str))
    assert rep["samples"] == 23 and rep["layers"][0]["name"] == "1"
    assert all("verdict" in row and "name" in row for row in rep["layers"])
    assert set(rep["thresholds"]) >= {"stale_shift", "collapse", "dead_share", "diverged_cka"}


def test_channel_dim_of_token_and_channels_first_layer_norms():
    from torchvision.models.convnext import LayerNorm2d

    tokens = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU())
    x = torch.randn(5, 7, 4)
    row = ns.diagnose(tokens, x).layers[0]
    with torch.no_grad():
        a = tokens(x).reshape(-1, 6).double()
    assert row["channels"] == 6
    assert row["collapse"] == pytest.approx(float((a.mean(0) ** 2).sum() / (a * a).mean(0).sum()), rel=1e-4)
    conv = nn.Sequential(nn.Conv2d(2, 3, 1), LayerNorm2d(3))  # LayerNorm over dim 1 of (N, C, H, W)
    row = ns.diagnose(conv, data()).layers[0]
    assert row["channels"] == 3


@pytest.mark.parametrize("kwargs,needle", [
    ({"noise_seed": 3}, "--noise-seed needs --noise"),
    ({"noise": "weight:0.1", "noise_samples": 2}, "--noise-samples"),
    ({"noise": "weight:0.1", "noise_mode": "sometimes"}, "--noise-mode"),
])
def test_noise_options_checked_like_recalibrate(kwargs, needle):
    from normsurgeon.calibrate.noise import NoiseSpecError

    for fn in (ns.diagnose, ns.recalibrate):
        with pytest.raises(NoiseSpecError, match=needle):
            fn(small_cnn(), data(), **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_gives_the_cpu_figures():
    model = randomize_norm_stats(small_cnn())
    x = data(40)
    cpu = ns.diagnose(model, x, teacher=model, noise="weight:0.1").layers
    gpu = ns.diagnose(copy.deepcopy(model).cuda(), x, teacher=copy.deepcopy(model).cuda(), noise="weight:0.1").layers
    for a, b in zip(cpu, gpu):
        assert a["verdict"] == b["verdict"]
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
