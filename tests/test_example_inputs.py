"""example_inputs=: models taking several inputs (image + mask) or integer token ids (Embedding first)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normsurgeon as ns
from normsurgeon.errors import ModelSpecError


class ImageMask(nn.Module):
    """forward(image, mask): conv features of the image, gated by a downsampled mask."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.mconv = nn.Conv2d(1, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, image, mask):
        y = torch.relu(self.bn1(self.conv1(image)))
        y = torch.relu(self.bn2(self.conv2(y)))
        gate = torch.sigmoid(self.mconv(nn.functional.avg_pool2d(mask, 2)))
        return self.head((y * gate).mean((2, 3)))


class TokenConv(nn.Module):
    """Token ids -> Embedding -> Conv1d -> BatchNorm1d -> ReLU -> Conv1d -> BatchNorm1d -> pooled logits."""

    def __init__(self, vocab=50, dim=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv1 = nn.Conv1d(dim, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        y = self.emb(ids).transpose(1, 2)
        y = torch.relu(self.bn1(self.conv1(y)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.out(y.mean(2))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _image_mask():
    torch.manual_seed(0)
    model = _randomize_bn(ImageMask())
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 16, 16, generator=g)
    mask = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    return model, image, mask


def _tokens():
    torch.manual_seed(0)
    model = _randomize_bn(TokenConv())
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(2))
    return model, ids


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()


def test_two_inputs_tuple_and_dict_fold_exact():
    model, image, mask = _image_mask()
    with torch.no_grad():
        ref = model(image, mask)
    for ex in ((image, mask), {"image": image, "mask": mask}):
        res = ns.fold(model, example_inputs=ex, verify=True)
        assert _bn_count(res.model) == 0
        assert res.info["input_shape"] == [2, 3, 16, 16]
        with torch.no_grad():
            got = res.model(image, mask)
        assert _rel(ref, got) < 1e-5
        # a different mask changes the output: the mask really is an input of the folded model
        with torch.no_grad():
            assert _rel(ref, res.model(image, 1 - mask)) > 1e-3


def test_embedding_fold_keeps_ids_integer_and_exact():
    model, ids = _tokens()
    seen = []
    model.emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    res = ns.fold(model, example_inputs=ids, verify=True)
    assert seen and all(d == torch.int64 for d in seen)  # never cast to float (float64 recheck included)
    assert _bn_count(res.model) == 0
    with torch.no_grad():
        assert _rel(model(ids), res.model(ids)) < 1e-5


def test_convert_gn_and_frozen_with_example_inputs():
    model, image, mask = _image_mask()
    res = ns.convert(model, "gn:4", example_inputs=(image, mask))
    assert _bn_count(res.model) == 0
    assert sum(isinstance(m, nn.GroupNorm) for m in res.model.modules()) == 2
    assert res.verification.batch_independent
    with torch.no_grad():  # independent check: sample 0 alone gives the same output as in the batch
        assert _rel(res.model(image, mask)[:1], res.model(image[:1], mask[:1])) < 1e-5
    frozen = ns.convert(model, "frozen", example_inputs={"image": image, "mask": mask}, verify=True)
    with torch.no_grad():
        assert _rel(model(image, mask), frozen.model(image, mask)) < 1e-5

    tok, ids = _tokens()
    res = ns.convert(tok, "frozen", example_inputs=ids, verify=True)
    assert res.verification.batch_independent and res.verification.ok
    with torch.no_grad():
        assert _rel(tok(ids), res.model(ids)) < 1e-5


def test_batch_independence_check_perturbs_integer_inputs():
    """A model that mixes samples through its integer input must be caught: the check may not leave
    token ids untouched (nor cast them to float noise)."""
    from normsurgeon.graph.inputs import from_example
    from normsurgeon.graph.verify import batch_independence_error

    tok, ids = _tokens()
    train_bn = ns.convert(tok, "gn:4", example_inputs=ids).model
    assert batch_independence_error(train_bn, from_example(ids, train_bn), train=True) < 1e-5
    # train-mode BatchNorm: sample 0's output depends on the other samples' tokens
    assert batch_independence_error(tok, from_example(ids, tok), train=True) > 1e-3


def test_inspect_lists_bn_layers():
    model, image, mask = _image_mask()
    rep = ns.inspect(model, example_inputs=(image, mask))
    names = {l.name: l for l in rep.layers}
    assert {"bn1", "bn2"} <= set(names)
    assert names["bn2"].input_shape == [2, 16, 8, 8]
    tok, ids = _tokens()
    rep = ns.inspect(tok, example_inputs=ids)
    assert {l.name for l in rep.layers} == {"bn1", "bn2"}
    assert [l.input_shape for l in rep.layers] == [[3, 16, 20], [3, 16, 20]]


def test_export_two_inputs_verified_against_ort(tmp_path):
    import onnxruntime as ort

    model, image, mask = _image_mask()
    path = tmp_path / "m.onnx"
    rep = ns.export_onnx(model, path, example_inputs={"image": image, "mask": mask}, verify=True)
    assert rep.verification["ok"] and rep.batchnorm_nodes == 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in sess.get_inputs()) == ["image", "mask"]
    g = torch.Generator().manual_seed(5)
    img3 = torch.randn(3, 3, 16, 16, generator=g)  # another batch size: the batch axis is symbolic
    mask3 = (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float()
    (got,) = sess.run(None, {"image": img3.numpy(), "mask": mask3.numpy()})
    with torch.no_grad():
        ref = model(img3, mask3).numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_export_token_ids_stay_integer(tmp_path):
    import onnxruntime as ort

    tok, ids = _tokens()
    path = tmp_path / "t.onnx"
    rep = ns.export_onnx(tok, path, example_inputs=ids, verify=True)
    assert rep.verification["ok"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(int64)"
    (got,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        ref = tok(ids).numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("verb", ["convert", "fold", "equalize", "inspect"])
def test_input_shape_and_example_inputs_together_refused(verb):
    model, image, mask = _image_mask()
    with pytest.raises(ModelSpecError, match="either input_shape or example_inputs"):
        getattr(ns, verb)(model, input_shape=(2, 3, 16, 16), example_inputs=(image, mask))


def test_export_refuses_both_and_writes_nothing(tmp_path):
    model, image, mask = _image_mask()
    with pytest.raises(ModelSpecError, match="either input_shape or example_inputs"):
        ns.export_onnx(model, tmp_path / "x.onnx", input_shape=(2, 3, 16, 16), example_inputs=(image, mask))
    assert not list(tmp_path.iterdir())


def test_wrong_example_inputs_is_a_user_error():
    from normsurgeon.errors import ProbeError

    model, image, _ = _image_mask()
    with pytest.raises(ProbeError, match="example inputs"):
        ns.fold(model, example_inputs=image)  # mask missing
    with pytest.raises(ModelSpecError, match="tensor"):
        ns.fold(model, example_inputs=(image, "mask"))


class OptionalMask(ImageMask):
    def forward(self, image, mask=None):
        if mask is None:
            mask = torch.ones_like(image[:, :1])
        return super().forward(image, mask)


def test_keyword_with_default_stays_an_input_of_the_traced_graph():
    """``mask=None`` is bound as a constant for tracing unless the example inputs supply it."""
    model, image, mask = _image_mask()
    opt = OptionalMask()
    opt.load_state_dict(model.state_dict())
    opt.eval()
    res = ns.fold(opt, example_inputs={"image": image, "mask": mask}, verify=True)
    assert res.path == "fx" and _bn_count(res.model) == 0
    with torch.no_grad():
        assert _rel(model(image, mask), res.model(image, mask=mask)) < 1e-5
        assert _rel(model(image, 1 - mask), res.model(image, mask=1 - mask)) < 1e-5


def test_float64_rechecks_keep_token_ids_integer():
    """fold's and convert's float64 rechecks (run when float32 misses 1e-5) cast floats only: the
    embedding still gets int64 ids and the float64 comparison is made (not skipped as unrunnable)."""
    from normsurgeon.graph.inputs import from_example
    from normsurgeon.passes import convert as convert_mod
    from normsurgeon.passes import fold as fold_mod
    from normsurgeon.report import Verification

    tok, ids = _tokens()
    x = from_example(ids, tok)
    folded = ns.fold(tok, example_inputs=ids).model
    seen = []
    tok.emb.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    ver, info = fold_mod._recheck_float64(tok, folded, x, Verification(1e-3, 1e-3, tolerance=1e-5))
    assert info["float64_max_rel_error"] < 1e-9 and ver.tolerance > 1e-5
    frozen = ns.convert(tok, "frozen", example_inputs=ids).model
    ver = convert_mod._recheck_float64(tok, frozen, x, Verification(1e-3, 1e-3, tolerance=1e-5))
    assert ver.note and "exact in float64" in ver.note
    assert seen and all(d == torch.int64 for d in seen)
