"""In-place BN normalization during the statistics pass: which layers may overwrite their input (and
which must not), statistics bit-identical to the out-of-place pass and equal to torch's train-mode
BN, the C normalization equal to torch's BN, and the user's model never touched."""
import pytest
import torch
import torchvision
from torch import fx, nn

import normsurgeon
import normsurgeon.calibrate.recalibrate as recalibrate_module
from normsurgeon.calibrate.inplace import in_place_producers, out_of_place, pairs_from_graph
from normsurgeon.native import moments as native
from tests.test_calibrate_stats import reference_stats
from tests.util import randomize_norm_stats

pytestmark = pytest.mark.skipif(native.kernel() is None, reason=f"no native kernel here: {native.why_not()}")


def stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def recal_both(model, x, batch_size=4):
    """(in place, out of place) results over the same batches."""
    fast = normsurgeon.recalibrate(model, x, batch_size=batch_size, shuffle=False)
    with out_of_place():
        slow = normsurgeon.recalibrate(model, x, batch_size=batch_size, shuffle=False)
    return fast, slow


def assert_same_stats(a, b):
    sa, sb = stats(a), stats(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_reference(model, result, x, bounds):
    ref = reference_stats(model, x, bounds)
    got = dict(result.named_modules())
    for name, (mean, var, calls) in ref.items():
        torch.testing.assert_close(got[name].running_mean, mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[name].running_var, var.float(), rtol=1e-4, atol=1e-5)


# --- which layers -------------------------------------------------------------------------------

def test_resnet18_pairs_every_bn_with_its_conv():
    m = torchvision.models.resnet18(weights=None).eval()
    pairs, why = in_place_producers(m)
    assert why == ""
    named = {id(mod): name for name, mod in m.named_modules()}
    got = {named[id(bn)]: named[id(src)] for bn, src in pairs.items()}
    assert len(got) == 20
    assert got["bn1"] == "conv1"
    assert got["layer1.0.bn2"] == "layer1.0.conv2"
    assert got["layer2.0.downsample.1"] == "layer2.0.downsample.0"
    assert not any("forward" in vars(mod) for mod in m.modules())  # the model itself was not traced


class ReusedConvOutput(nn.Module):
    """The conv's output feeds the BN and, after it, a residual sum: overwriting it would change what
    the second BN sees."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        return self.bn2(self.bn(h) + h)


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.b(self.bn(self.a(x))))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class MyBN(nn.BatchNorm2d):
    pass


class KeepingConv(nn.Conv2d):
    """A conv subclass that keeps its output: only torch's own conv/linear classes may produce."""

    def forward(self, x):
        self.last = super().forward(x)
        return self.last


@pytest.mark.parametrize("make, eligible", [
    (ReusedConvOutput, []),  # bn's input has two users; bn2's input is a sum
    (SharedBN, []),
    (SharedConv, []),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4)), []),  # a subclass may do more than normalize
    (lambda: nn.Sequential(KeepingConv(3, 4, 1), nn.BatchNorm2d(4)), []),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)), []),  # relu's output, not a conv's
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 25, 6),
                           nn.BatchNorm1d(6)), ["1", "4"]),
])
def test_only_plain_bn_fed_by_its_own_single_use_conv(make, eligible):
    m = make().eval()
    pairs, why = pairs_from_graph(m)
    named = {id(mod): name for name, mod in m.named_modules()}
    assert why == ""
    assert sorted(named[id(bn)] for bn in pairs) == eligible


@pytest.fixture
def graph_rule_only(monkeypatch):
    """Lift the library-code rule so that purpose-built models reach the graph and run-time checks."""
    monkeypatch.setattr(recalibrate_module, "in_place_producers", pairs_from_graph)


def test_user_written_forwards_never_run_in_place():
    torch.manual_seed(0)
    m = ReusedConvOutput().eval()
    pairs, why = in_place_producers(m)
    assert pairs == {}
    assert why == ("the model (ReusedConvOutput) runs its own forward code; only torch, torchvision, timm and "
                   "normsurgeon modules run in place")
    x = torch.randn(12, 3, 6, 6) * 2 + 1
    res = normsurgeon.recalibrate(m, x, batch_size=4, shuffle=False)
    assert res.info["in_place"] == "no: " + why
    assert_reference(m, res.model, x, [(0, 4), (4, 8), (8, 12)])
    # a torch container holding a user class is refused the same way
    assert in_place_producers(nn.Sequential(KeepingConv(3, 4, 1), nn.BatchNorm2d(4)))[1].startswith("0 (KeepingConv)")


def test_a_reused_conv_output_is_left_intact(graph_rule_only):
    torch.manual_seed(0)
    m = ReusedConvOutput().eval()
    x = torch.randn(12, 3, 6, 6) * 2 + 1
    res = normsurgeon.recalibrate(m, x, batch_size=4, shuffle=False)
    assert res.info["in_place"] == "0 of 2 BN layers (their input is used by nothing else)"
    assert_reference(m, res.model, x, [(0, 4), (4, 8), (8, 12)])


def test_hooks_anywhere_rule_the_model_out():
    m = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1)), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                      nn.BatchNorm2d(4)).eval()
    assert len(in_place_producers(m)[0]) == 2
    kept = []
    handle = m[0].register_forward_hook(lambda mod, args, out: kept.append(out))  # a hook on the wrapper
    assert in_place_producers(m) == ({}, "0 has hooks or an instance-level forward")
    x = torch.randn(8, 3, 5, 5)
    normsurgeon.recalibrate(m, x, batch_size=4, shuffle=False)
    with torch.no_grad():  # the kept outputs are the conv's, not overwritten by the BN
        torch.testing.assert_close(kept[-1], m[0](x[4:8]), rtol=0, atol=0)
    handle.remove()
    m[2].forward = m[2].forward  # someone set an instance forward
    assert in_place_producers(m) == ({}, "2 has hooks or an instance-level forward")
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        assert in_place_producers(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))) == (
            {}, "global module hooks are registered")
    finally:
        handle.remove()


def test_a_hook_registered_during_the_pass_stops_the_overwrite():
    """A global hook added mid-pass (from the progress callback) keeps conv outputs that stay intact."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(12, 3, 7, 7)
    kept, handles = [], []

    def keep(mod, args, out):
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            kept.append(out)

    def progress(n):
        if not handles:
            handles.append(nn.modules.module.register_module_forward_hook(keep))

    try:
        res = normsurgeon.recalibrate(m, x, batch_size=4, shuffle=False, progress=progress)
    finally:
        for h in handles:
            h.remove()
    # batch 1 ran before the hook: both BN in place; batches 2 and 3 after it: none
    assert res.info["statistics_kernel"] == "native (one-pass C kernel); 2 of 6 layer calls normalized in place"
    assert len(kept) == 2
    with torch.no_grad():
        torch.testing.assert_close(kept[-1], m[0](x[8:12]), rtol=0, atol=0)


class Streaming(nn.Module):
    """Keeps the last conv output on ``self`` and adds it to the next batch: an overwrite would leak
    across batches. Tracing stores a proxy there; the real model must never see it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.last = None

    def forward(self, x):
        h = self.conv(x)
        prev, self.last = self.last, h
        y = self.bn(h)
        return y if prev is None or prev.shape != y.shape else y + prev


def test_a_forward_that_stores_activations_keeps_the_out_of_place_path(graph_rule_only):
    torch.manual_seed(0)
    m = Streaming().eval()
    pairs, why = pairs_from_graph(m)
    assert pairs == {} and why == "its forward stores values on the model"
    assert m.last is None  # the model was not traced itself
    x = torch.randn(12, 3, 5, 5)
    fast, slow = recal_both(m, x)
    assert fast.info["in_place"] == "no: its forward stores values on the model"
    assert "in place" not in fast.info["statistics_kernel"]
    assert_same_stats(fast.model, slow.model)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_models_say_why_and_stay_exact(graph_rule_only):
    torch.manual_seed(0)
    m = DataDependent().eval()
    x = torch.randn(12, 3, 5, 5)
    res = normsurgeon.recalibrate(m, x, batch_size=4, shuffle=False)
    assert res.info["in_place"].startswith("no: not traceable (TraceError")
    assert_reference(m, res.model, x, [(0, 4), (4, 8), (8, 12)])


class TracesDifferently(nn.Module):
    """Eager code hands the BN a copy and reuses the conv output; the traced graph shows conv -> bn.
    The run-time check (the BN must receive the very tensor its producer returned) keeps the copy
    path out of place, and the statistics exact."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv(x)
        if fx._symbolic_trace.is_fx_tracing():
            return self.bn(h)
        return self.bn2(self.bn(h.clone()) + h)


def test_the_run_time_identity_check_catches_what_the_graph_missed(graph_rule_only):
    torch.manual_seed(0)
    m = TracesDifferently().eval()
    pairs, _ = pairs_from_graph(m)
    assert list(pairs) == [m.bn]
    x = torch.randn(12, 3, 5, 5) * 2 + 1
    fast, slow = recal_both(m, x)
    assert "in place" not in fast.info["statistics_kernel"]
    assert_same_stats(fast.model, slow.model)
    assert_reference(m, fast.model, x, [(0, 4), (4, 8), (8, 12)])


# --- the same statistics --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: torchvision.models.resnet18(weights=None, num_classes=10),
    lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10),
    lambda: torchvision.models.densenet121(weights=None, num_classes=10),  # half its BN follow a cat
])
def test_zoo_models_in_place_equal_out_of_place_bit_for_bit(make):
    torch.manual_seed(0)
    m = randomize_norm_stats(make(), seed=3).eval()
    x = torch.randn(12, 3, 32, 32) * 2 + 0.5
    fast, slow = recal_both(m, x)
    assert "normalized in place" in fast.info["statistics_kernel"]
    assert "in place" not in slow.info["statistics_kernel"]
    assert slow.info["in_place"].startswith("no: turned off")
    assert_same_stats(fast.model, slow.model)
    assert not any("forward" in vars(mod) for mod in fast.model.modules())
    assert not any("forward" in vars(mod) for mod in m.modules())


def test_resnet18_matches_torch_train_mode_bn():
    torch.manual_seed(0)
    m = randomize_norm_stats(torchvision.models.resnet18(weights=None, num_classes=10), seed=2).eval()
    x = torch.randn(10, 3, 32, 32) * 2 + 0.5
    res = normsurgeon.recalibrate(m, x, batch_size=5, shuffle=False)
    assert res.info["statistics_kernel"] == "native (one-pass C kernel); 40 of 40 layer calls normalized in place"
    assert_reference(m, res.model, x, [(0, 5), (5, 10)])
    with torch.no_grad():  # the returned model runs normally: no wrapper left on the convs
        torch.testing.assert_close(res.model(x[:2]), res.model(x[:2]))


def test_noise_mode_with_in_place_matches_out_of_place():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    x = torch.randn(16, 3, 9, 9)
    for mode, k in (("fixed", 1), ("resample", 3)):
        kw = dict(noise="weight:0.1", noise_mode=mode, noise_seed=4, noise_samples=k, batch_size=8, shuffle=False)
        fast = normsurgeon.recalibrate(m, x, **kw)
        with out_of_place():
            slow = normsurgeon.recalibrate(m, x, **kw)
        assert "normalized in place" in fast.info["statistics_kernel"]
        assert_same_stats(fast.model, slow.model)


# --- the C normalization ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, affine", [
    ((6, 5), True), ((300, 7), False), ((4, 3, 10), True), ((3, 6, 7, 9), True), ((2, 4, 3, 5, 6), False),
    ((8, 64, 40, 40), True),  # large enough to run on several threads
])
def test_in_place_norm_equals_torch_bn_eval(shape, affine):
    torch.manual_seed(1)
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](shape[1], affine=affine)
    bn.running_mean.normal_(0, 3)
    bn.running_var.uniform_(0.1, 4)
    if affine:
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    bn.eval()
    x = torch.randn(*shape) * 2 + 1
    with torch.no_grad():
        want = bn(x)
        y = x.clone()
        assert native.InPlaceNorm(bn)(y) is True
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


def test_in_place_norm_refuses_what_it_cannot_take_and_leaves_it_untouched():
    bn = nn.BatchNorm2d(4).eval()
    norm = native.InPlaceNorm(bn)
    for x in (torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3),
              torch.randn(2, 4, 3, 3).transpose(2, 3), torch.randn(2, 4, 3, 3, requires_grad=True)):
        before = x.detach().clone()
        assert norm(x) is False
        assert torch.equal(x.detach(), before)
    with pytest.raises(ValueError):
        native.InPlaceNorm(nn.BatchNorm2d(4).double())
