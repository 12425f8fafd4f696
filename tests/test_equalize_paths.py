"""equalize's two ways to find its pairs agree: the torch.fx graph and the autograd graph of one probe
forward (the path for models fx cannot trace, or traces into a graph that is not the model). On
traceable zoo models with residual adds, concats, channel shuffles, spatial means and flattens into
a linear, both must list the same producers, channels, consumers and flatten blocks, and skip the same
producers; and balancing from the autograd plan must be exact on an input it never saw."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import normsurgeon
from normsurgeon.calibrate.digits_cnn import digits_cnn
from normsurgeon.passes.equalize import _fx_plan, _graph_of, plan_for
from normsurgeon.passes.equalize_swap import swap_plan
from tests.util import randomize_norm_stats


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 10), nn.BatchNorm1d(10),
                         nn.LeakyReLU(0.1), nn.Linear(10, 3))


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 32, 32)),
    "squeezenet1_0": (lambda: torchvision.models.squeezenet1_0(weights=None), (2, 3, 64, 64)),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None), (2, 3, 32, 32)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(weights=None), (2, 3, 32, 32)),
    "digits_cnn": (digits_cnn, (2, 1, 16, 16)),
    "mlp": (_mlp, (2, 3, 4, 4)),
}


def _pairs(plan):
    return {(p.producer, p.kind, p.channels, frozenset((c.name, c.block) for c in p.consumers)) for p in plan.pairs}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_autograd_plan_equals_graph_plan(name):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_norm_stats(factory()).eval()
    x = torch.randn(shape)
    gm, problem = _graph_of(model, x)
    assert problem is None
    graph, autograd = _fx_plan(gm), swap_plan(model, x)
    assert graph.pairs, "nothing to compare"
    assert _pairs(autograd) == _pairs(graph)
    assert {c.target for c in autograd.skipped} == {c.target for c in graph.skipped}
    assert plan_for(model, x)[1] == "fx"


def test_autograd_plan_balances_exactly(monkeypatch):
    torch.manual_seed(0)
    model = randomize_norm_stats(torchvision.models.shufflenet_v2_x0_5(weights=None)).eval()
    import normsurgeon.passes.equalize as eq

    via_graph = normsurgeon.equalize(model, input_shape=(2, 3, 32, 32), iters=5)
    assert via_graph.path == "fx"
    monkeypatch.setattr(eq, "_graph_of", lambda m, x: (None, "torch.fx cannot trace: forced for the test"))
    res = normsurgeon.equalize(model, input_shape=(2, 3, 32, 32), iters=5, verify=True)
    assert res.path == "module-swap" and res.changes[0].action == "fallback"
    assert res.info["weight_norm_after"] < 0.95 * res.info["weight_norm_before"]
    # the same pairs, in the same call order: the same weights as the graph path
    for (n, p), q in zip(res.model.named_parameters(), via_graph.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    x = torch.randn(3, 3, 40, 40)  # another batch size and resolution than the probe
    with torch.no_grad():
        ref, out = model(x), res.model(x)
    assert ref.std() > 0
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_ties_the_graph_never_sees_are_skipped():
    """Data-dependent control flow: fx cannot trace it, and a channel that reaches an add is tied."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 2, 1)
            self.act = nn.SiLU()

        def forward(self, x):
            h = torch.relu(self.a(x))
            if h.mean() > -1e9:  # fx cannot trace a branch on a value
                h = self.b(h)
            return self.c(self.act(h)) + self.c.bias.view(1, -1, 1, 1)

    model = Gate().eval()
    res = normsurgeon.equalize(model, input_shape=(2, 3, 8, 8), verify=True)
    assert res.path == "module-swap" and "cannot trace" in res.changes[0].detail
    detail = {c.target: (c.action, c.detail) for c in res.changes}
    assert detail["a"] == ("equalized", "balanced against b")
    assert detail["b"][0] == "skipped" and "Silu" in detail["b"][1]
    assert detail["c"][0] == "skipped" and "residual add" in detail["c"][1]
