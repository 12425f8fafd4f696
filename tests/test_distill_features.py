"""The layer-wise term of distill: its value against an independent computation over the same
layers, zero for a student that computes what the teacher computes, and its effect (students trained
with it end closer to the teacher's BN outputs than students trained on the outputs alone)."""
import copy

import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.calibrate.data import load_digits
from normsurgeon.calibrate.digits_cnn import train_digits_cnn
from normsurgeon.distillation.features import FeatureTaps
from normsurgeon.errors import DistillError


@pytest.fixture(scope="module")
def teacher():
    return train_digits_cnn(0)


def _bn_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got, hs = {}, []
    for n in names:
        hs.append(model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: got.__setitem__(n, o.detach())))
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return got


def _reference_term(student, teacher, x) -> float:
    """mean over BN layers of mean((s - t)^2 / max(gamma^2, 1e-2 mean(gamma^2))), in float64."""
    names = [n for n, m in teacher.named_modules() if isinstance(m, nn.BatchNorm2d)]
    s, t = _bn_outputs(student, names, x), _bn_outputs(teacher, names, x)
    terms = []
    for n in names:
        g2 = teacher.get_submodule(n).weight.detach().double() ** 2
        v = torch.maximum(g2, 1e-2 * g2.mean()).view(1, -1, 1, 1)
        terms.append((((s[n].double() - t[n].double()) ** 2) / v).mean())
    return float(torch.stack(terms).mean())


def test_term_matches_an_independent_computation(teacher):
    student = normsurgeon.convert(teacher, to="gn+ws").model.eval()
    x = load_digits("test").x[:32]
    with FeatureTaps(student, teacher) as taps:
        assert taps.names == ["1", "5", "9"]
        with torch.no_grad():
            teacher(x), student(x)
        got = float(taps.loss())
    ref = _reference_term(student, teacher, x)
    assert ref > 0.01  # a converted student is far from the teacher inside
    assert got == pytest.approx(ref, rel=1e-4)
    # a copy of the teacher computes what the teacher computes: nothing to match
    twin = copy.deepcopy(teacher)
    with FeatureTaps(twin, teacher) as taps:
        with torch.no_grad():
            teacher(x), twin(x)
        assert float(taps.loss()) == 0.0
    # hooks are gone after the block
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_layer_term_brings_the_inside_closer(teacher):
    student = normsurgeon.convert(teacher, to="ln").model
    train_x, test_x = load_digits("train").x, load_digits("test").x
    common = dict(steps=80, batch_size=64, lr=3e-3, seed=0)
    outputs_only = normsurgeon.distill(student, teacher, train_x, feature_weight=0.0, **common)
    with_layers = normsurgeon.distill(student, teacher, train_x, feature_weight=1.0, **common)
    far, near = _reference_term(outputs_only.model, teacher, test_x), _reference_term(with_layers.model, teacher, test_x)
    assert near < 0.5 * far, (near, far)
    stage = with_layers.report["stages"][-1]
    assert stage["layers_matched"] == 3 and stage["feature_weight"] == 1.0
    assert outputs_only.report["stages"][-1]["layers_matched"] == 0
    assert normsurgeon.distill(student, teacher, train_x, steps=1).report["feature_weight"] == 0.0  # off by default


def test_term_is_a_mean_of_per_sample_terms(teacher):
    """What data parallelism needs: the gradient of the term on a batch equals the mean of the
    gradients on its halves (exact in float64; a batch statistic in the normalizer would break it)."""
    student = normsurgeon.convert(teacher, to="gn+ws").model.eval().double()
    t = copy.deepcopy(teacher).double()
    x = load_digits("train").x[:32].double()

    def grads(xb):
        student.zero_grad()
        with FeatureTaps(student, t) as taps:
            with torch.no_grad():
                t(xb)
            student(xb)
            taps.loss().backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    whole, first, second = grads(x), grads(x[:16]), grads(x[16:])
    assert len(whole) >= 6
    for a, b, c in zip(first, second, whole):
        torch.testing.assert_close((a + b) / 2, c, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), True])
def test_bad_feature_weight(teacher, bad):
    with pytest.raises(DistillError, match="feature-weight"):
        normsurgeon.distill(teacher, teacher, load_digits("train").x, steps=1, feature_weight=bad)


def test_resume_from_a_checkpoint_written_before_the_setting_existed(teacher, tmp_path):
    """A checkpoint whose config has no feature_weight was a run without the layer-wise term: it resumes
    as one, and a checkpoint whose config is not a mapping is refused with a DistillError."""
    student = normsurgeon.convert(teacher, to="gn").model
    x = load_digits("train").x
    ck = tmp_path / "run.ckpt"
    common = dict(steps=6, batch_size=32, lr=3e-3, checkpoint=ck, checkpoint_every=3)
    whole = normsurgeon.distill(student, teacher, x, **{**common, "checkpoint": None})
    first = normsurgeon.distill(student, teacher, x, **common)  # leaves the step-3 checkpoint
    assert ck.exists() and first is not None
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 3
    del state["config"]["feature_weight"]
    torch.save(state, ck)
    resumed = normsurgeon.distill(student, teacher, x, resume=True, **common)
    assert resumed.report["resumed_from_step"] == 3
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(DistillError, match="feature_weight"):
        normsurgeon.distill(student, teacher, x, resume=True, feature_weight=1.0, **common)
    state["config"] = ["not", "a", "mapping"]
    torch.save(state, ck)
    with pytest.raises(DistillError, match="not a distill checkpoint"):
        normsurgeon.distill(student, teacher, x, resume=True, **common)
