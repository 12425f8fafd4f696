"""Instance-enhancement BN: the reference formula in float64, gradcheck, the exact gate rewrite that
lets fold move the normalization into the conv, micro-batch training, and convert/fold via the CLI."""
import copy
import json

import torch

import normsurgeon
from normsurgeon.layers import IEBNGate, InstanceEnhancedBatchNorm
from tests import layers_train
from tests.util import run_cli


def _iebn(c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = InstanceEnhancedBatchNorm(c).double()
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g))
        m.act.gate_weight.copy_(torch.randn(c, generator=g))
        m.act.gate_bias.copy_(torch.randn(c, generator=g))
        m.running_mean.copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return m


def _reference(x, mean, var, m):
    """gbup-group/IEBN _BatchAttNorm: sigmoid(GAP(input) * w + b) gates gamma; BN without affine."""
    gap = x.mean(dim=(2, 3), keepdim=True)
    att = torch.sigmoid(gap * m.act.gate_weight.view(1, -1, 1, 1) + m.act.gate_bias.view(1, -1, 1, 1))
    xn = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    return xn * (m.weight.view(1, -1, 1, 1) * att) + m.bias.view(1, -1, 1, 1)


def test_defaults_follow_the_reference():
    m = InstanceEnhancedBatchNorm(3)
    assert torch.all(m.act.gate_weight == 0) and torch.all(m.act.gate_bias == -1)
    assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_train_and_eval_match_the_formula():
    m = _iebn()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 2 + 1
    ref_eval = _reference(x, m.running_mean, m.running_var, m)
    assert torch.allclose(m.eval()(x), ref_eval)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(m.train()(x), _reference(x, mean, var, m))


def test_gate_rewrite_is_exact_and_the_gate_alone_reproduces_eval():
    m = _iebn().eval()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 - 2
    scale, shift = m.eval_affine()
    u = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    sigma = torch.sqrt(m.running_var + 1e-5)
    assert torch.allclose(m.act.gate_scale, m.act.gate_weight * sigma)
    assert torch.allclose(m.act.gate_shift, m.act.gate_weight * m.running_mean + m.act.gate_bias)
    assert isinstance(m.act, IEBNGate)
    assert torch.allclose(m.act(u), m(x), atol=1e-12)
    assert torch.allclose(m(x)[:1], m(x[:1]))  # eval: batch-independent


def test_gradcheck_train_and_eval():
    m = _iebn(c=3)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        return copy.deepcopy(m)(x)  # a fresh copy: the running-stat update must not change what the check sees

    assert torch.autograd.gradcheck(f, (x,))
    m.eval()
    assert torch.autograd.gradcheck(m, (x,))


def test_batch_two_digits_training_and_exact_fold():
    model = normsurgeon.convert(layers_train.cnn(), "iebn", input_shape=(2, 1, 16, 16)).model
    layers_train.train(model, batch=2, steps=150, lr=0.02)
    model = normsurgeon.recalibrate(model, "digits:train").model.eval()
    assert layers_train.accuracy(model) > 0.3  # chance is 0.1
    res = normsurgeon.fold(copy.deepcopy(model), input_shape=(2, 1, 16, 16))
    assert [c.action for c in res.changes] == ["folded"] * 3
    gates = [m for m in res.model.modules() if isinstance(m, IEBNGate)]
    assert len(gates) == 3 and not any(isinstance(m, InstanceEnhancedBatchNorm) for m in res.model.modules())
    x = layers_train.test_x()[:64]
    with torch.no_grad():
        ref = model(x)
        assert (res.model(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_cli_convert_then_fold(tmp_path):
    conv, folded = tmp_path / "iebn.pt", tmp_path / "folded.pt"
    spec = "normsurgeon:digits_cnn"
    r = run_cli("convert", spec, "--to", "iebn", "--input-shape", "2,1,16,16", "-o", str(conv), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["replaced"] == 3
    r = run_cli("fold", str(conv), "--input-shape", "2,1,16,16", "-o", str(folded), "--verify", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"] == {"folded": 3}
    a, b = normsurgeon.load_model(str(conv)).eval(), normsurgeon.load_model(str(folded)).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() <= 1e-5 * a(x).abs().max()
    assert sum(isinstance(m, IEBNGate) for m in b.modules()) == 3
