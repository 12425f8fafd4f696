"""convert on hand-built models: BN1d after Linear and over sequences, BN3d, SyncBatchNorm, functional
batch_norm, awkward channel counts, --keep / per-layer recipes, non-affine and frozen BN, training
after conversion (problems seen in other tools: opacus#567, #390/#580, #828, pytorch#122070)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normsurgeon
from normsurgeon.errors import ModelSpecError, VerificationError
from normsurgeon.graph.verify import batch_independence_error
from normsurgeon.layers.frozen_bn import FrozenBatchNorm
from tests.util import randomize_norm_stats

BN = nn.modules.batchnorm._BatchNorm


def bns(model):
    return [n for n, m in model.named_modules() if isinstance(m, BN)]


class LinearBN(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.fc = nn.Linear(8, c)
        self.bn = nn.BatchNorm1d(c)
        self.out = nn.Linear(c, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


class ConvBN(nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FunctionalBN(nn.Module):
    """A conv followed by a functional batch_norm whose tensors are stored on the module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.register_buffer("rm", torch.randn(16) * 0.5)
        self.register_buffer("rv", torch.rand(16) + 0.5)
        self.w = nn.Parameter(torch.rand(16) + 0.5)
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return F.relu(F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, False, 0.1, 1e-5))


@pytest.mark.parametrize("to", ["gn", "ln", "in", "gn+ws"])
def test_bn1d_after_linear_never_gets_one_value_groups(to):
    """opacus#567: BatchNorm1d(4) on (N, 4) became GroupNorm(4, 4) and output zeros."""
    model = randomize_norm_stats(LinearBN(4)).eval()
    r = normsurgeon.convert(model, to, input_shape=(2, 8))
    gn = r.model.bn
    assert isinstance(gn, nn.GroupNorm)
    assert gn.num_channels // gn.num_groups >= 4  # each group sees >= 4 values on (N, C) input
    assert not bns(r.model)
    x = torch.randn(6, 8)
    with torch.no_grad():
        h = r.model.bn(r.model.fc(x))
    assert h.std() > 0.1  # the signal survives
    note = [c.detail for c in r.changes if c.target == "bn"][0]
    if to != "ln":
        assert "groups" in note and "-> 1" in note


def test_bn1d_over_sequences_and_awkward_channel_count():
    """(N, C, L) input with C = 72 (opacus#390/#580): nearest divisor of 72 to 32 is 36, and it is reported."""
    model = randomize_norm_stats(ConvBN(nn.Conv1d(3, 72, 3), nn.BatchNorm1d(72))).eval()
    r = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 20))
    divisors = [d for d in range(1, 73) if 72 % d == 0]
    want = min(divisors, key=lambda d: (abs(d - 32), -d))
    assert r.model.bn.num_groups == want == 36
    assert "groups 32 -> 36" in [c.detail for c in r.changes if c.target == "bn"][0]
    assert type(r.model.conv).__name__ == "WSConv1d"
    x = torch.randn(3, 3, 20)
    assert batch_independence_error(r.model, x, train=True) <= 1e-5
    f = normsurgeon.convert(model, "frozen", input_shape=(2, 3, 20)).model
    with torch.no_grad():
        torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-6)


def test_layer_override_and_group_arg():
    model = randomize_norm_stats(ConvBN(nn.Conv1d(3, 72, 3), nn.BatchNorm1d(72))).eval()
    r = normsurgeon.convert(model, "gn", input_shape=(2, 3, 20), layers={"b*": "gn:8"})
    assert r.model.bn.num_groups == 8
    r = normsurgeon.convert(model, "gn:24", input_shape=(2, 3, 20))
    assert r.model.bn.num_groups == 24


@pytest.mark.parametrize("to", ["frozen", "gn+ws", "ln"])
def test_bn3d(to):
    model = randomize_norm_stats(ConvBN(nn.Conv3d(2, 16, 3), nn.BatchNorm3d(16))).eval()
    x = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64)
    model = model.double()
    r = normsurgeon.convert(model, to, input_shape=tuple(x.shape))
    assert not bns(r.model)
    assert batch_independence_error(r.model, x, train=True) <= 1e-10
    if to == "frozen":
        with torch.no_grad():
            torch.testing.assert_close(r.model(x), model(x), rtol=1e-12, atol=1e-12)
    if to == "gn+ws":
        assert type(r.model.conv).__name__ == "WSConv3d"


def test_sync_batchnorm_on_cpu_in_eval():
    model = randomize_norm_stats(ConvBN(nn.Conv2d(3, 16, 3), nn.SyncBatchNorm(16))).eval()
    x = torch.randn(2, 3, 8, 8)
    for to in ("frozen", "gn+ws"):
        r = normsurgeon.convert(model, to, input_shape=tuple(x.shape))
        assert not bns(r.model)
        assert r.verification.batch_independent
    f = normsurgeon.convert(model, "frozen", input_shape=tuple(x.shape)).model
    with torch.no_grad():
        torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-6)


def test_functional_batch_norm_is_materialized_then_converted():
    """pytorch#122070: F.batch_norm in a traced graph becomes a module, so convert (and fold) see it."""
    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 8, 8)
    r = normsurgeon.convert(model, "frozen", input_shape=tuple(x.shape))
    actions = [(c.action, c.target) for c in r.changes]
    assert actions[0][0] == "materialized" and ("replaced", actions[0][1]) in actions
    with torch.no_grad():
        ref = F.relu((model.conv(x) - model.rm[:, None, None]) / torch.sqrt(model.rv[:, None, None] + 1e-5)
                     * model.w[:, None, None] + model.b[:, None, None])
        torch.testing.assert_close(r.model(x), ref, rtol=1e-5, atol=1e-6)
    g = normsurgeon.convert(model, "gn+ws", input_shape=tuple(x.shape))
    assert any(c.action == "standardized" and c.target == "conv" for c in g.changes)
    assert g.verification.batch_independent
    # kept: the materialized BN must still accept the call's 4-D input
    k = normsurgeon.convert(model, "gn", input_shape=tuple(x.shape), keep=["functional_bn*"])
    assert [c.action for c in k.changes] == ["materialized", "kept"]
    with torch.no_grad():
        torch.testing.assert_close(k.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_keep_leaves_matching_layers_and_reports_them():
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet18"))
    r = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 32, 32), keep=["layer4.*"])
    kept = sorted(c.target for c in r.changes if c.action == "kept")
    assert kept == sorted(n for n in bns(model) if n.startswith("layer4."))
    assert sorted(bns(r.model)) == kept
    x = torch.randn(2, 3, 32, 32)
    assert r.verification.batch_independent  # a kept BN uses running statistics in eval ...
    assert batch_independence_error(r.model, x, train=True) > 1e-3  # ... but batch statistics in train
    full = normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 32, 32))
    assert batch_independence_error(full.model, x, train=True) <= 1e-5


def test_verify_raises_when_frozen_is_not_exact(monkeypatch):
    """--verify turns a failed exactness check into an error (the check must be able to fail)."""
    from normsurgeon.layers import frozen_bn

    model = randomize_norm_stats(ConvBN(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    normsurgeon.convert(model, "frozen", input_shape=(2, 3, 8, 8), verify=True)
    broken = frozen_bn.FrozenBatchNorm.eval_affine
    monkeypatch.setattr(frozen_bn.FrozenBatchNorm, "eval_affine",
                        lambda self: tuple(t * 1.01 for t in broken(self)))
    with pytest.raises(VerificationError, match="frozen changed outputs"):
        normsurgeon.convert(model, "frozen", input_shape=(2, 3, 8, 8), verify=True)


def test_non_affine_frozen_and_untracked_bn():
    """Opacus skips frozen or non-affine BN and resets gamma/beta: handle all three kinds."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                      nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, track_running_stats=False))
    randomize_norm_stats(m)
    for p in m[4].parameters():
        p.requires_grad_(False)
    m.eval()
    r = normsurgeon.convert(m, "gn:4", input_shape=(2, 3, 12, 12))
    assert r.model.get_submodule("1").weight is None
    assert not r.model.get_submodule("4").weight.requires_grad
    torch.testing.assert_close(r.model.get_submodule("4").weight, m[4].weight)
    f = normsurgeon.convert(m, "frozen", input_shape=(2, 3, 12, 12))
    skipped = [c for c in f.changes if c.action == "skipped"]
    assert [c.target for c in skipped] == ["7"] and "running" in skipped[0].detail
    assert isinstance(f.model.get_submodule("1"), FrozenBatchNorm)


@pytest.mark.parametrize("spec,to", [("torchvision:resnet18", "gn+ws"), ("timm:efficientnet_b0", "gn+ws"),
                                     ("torchvision:resnet18", "frozen")])
def test_converted_model_trains(spec, to):
    """opacus#828: in-place ReLU (resnet) and in-place fused act (timm) must not break backward."""
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    model = normsurgeon.load_model(spec)
    new = normsurgeon.convert(model, to, input_shape=(2, 3, 32, 32)).model.train()
    inplace = [m for m in new.modules() if getattr(m, "inplace", False)]
    assert inplace, "the test needs in-place activations"
    lr = 1e-3 if to == "frozen" else 0.02  # without batch statistics a random-init resnet needs a small step
    opt = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=lr)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    before = {n: p.detach().clone() for n, p in new.named_parameters()}
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(new(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    grads = [p.grad for p in new.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    moved = [n for n, p in new.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(grads)
    assert losses[-1] < losses[0]
    if to == "frozen":  # frozen buffers never move, in train mode too
        fb = [m for m in new.modules() if isinstance(m, FrozenBatchNorm)][0]
        assert not any(t.requires_grad for t in fb.buffers())


def test_input_model_is_not_mutated():
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:resnet18"))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    normsurgeon.convert(model, "gn+ws", input_shape=(2, 3, 32, 32))
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert bns(model) and type(model.conv1) is nn.Conv2d


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y.relu()
        return y


def test_untraceable_model_with_bad_probe_is_a_clean_error():
    """No fallback can run when the model itself rejects the probe: a one-line user error, not a crash."""
    model = Untraceable().eval()
    with pytest.raises(ModelSpecError, match="probe input of shape 2,5,8,8.*--input-shape"):
        normsurgeon.convert(model, "gn", input_shape=(2, 5, 8, 8))
    r = normsurgeon.convert(model, "frozen", input_shape=(2, 3, 8, 8))
    assert r.path == "module-swap" and r.verification.ok


def test_fx_graph_failing_on_probe_falls_back_to_module_swap():
    """A traced graph that bakes in a trace-time constant fails where the model works: module-swap runs."""
    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.bn(self.conv(x))
            n = 7 if torch.fx._symbolic_trace.is_fx_tracing() else x.shape[0]  # a graph valid for batch 7 only
            return y.reshape(n, -1)

    model = randomize_norm_stats(Baked()).eval()
    r = normsurgeon.convert(model, "frozen", input_shape=(2, 3, 8, 8))
    assert r.path == "module-swap"
    assert "traced graph fails on the probe input" in r.changes[0].detail
    assert r.verification.ok and isinstance(r.model.bn, FrozenBatchNorm)


class _BatchMeanModel(nn.Module):
    """Mixes samples on purpose (subtracts the batch mean): no conversion can make it batch-independent."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y - y.mean(dim=0, keepdim=True)


def test_verify_blames_the_model_not_the_norms_for_inherent_batch_mixing():
    model = randomize_norm_stats(_BatchMeanModel()).eval()
    res = normsurgeon.convert(model, "gn", input_shape=(3, 3, 8, 8), verify=True)  # must not raise
    assert res.verification.batch_independent is False
    assert "original model already mixes samples" in res.verification.note
    plain = randomize_norm_stats(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    ok = normsurgeon.convert(plain, "gn", input_shape=(3, 3, 8, 8), verify=True)
    assert ok.verification.batch_independent is True and ok.verification.note is None
