"""A new recipe is its layer plus one registry entry: a toy BatchNorm variant defined here, registered
once, gets convert, inspect, fold (its eval function is a per-channel affine) and recalibrate (it keeps
running estimates) without touching any other file."""
import pytest
import torch
from torch import nn

import normsurgeon
from normsurgeon.calibrate.data import load_digits
from normsurgeon.layers.moments import MeanVarMoments, channel_shape
from normsurgeon.recipes.registry import LayerSpec, RecipeEntry, Replacement, register, unregister


class ToyNorm(MeanVarMoments, nn.Module):
    """BN with its own parameter names' semantics: batch statistics in training, running ones at eval."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        if self.training:
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
        else:
            mean, var = self.running_mean, self.running_var
        s = channel_shape(x)
        return (x - mean.view(s)) / torch.sqrt(var.view(s) + self.eps) * self.weight.view(s) + self.bias.view(s)

    def eval_affine(self):
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


def _build(ctx):
    bn = ctx.bn
    layer = ToyNorm(bn.num_features, bn.eps)
    with torch.no_grad():
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
        layer.running_mean.copy_(bn.running_mean)
        layer.running_var.copy_(bn.running_var)
    return Replacement(norm=layer)


@pytest.fixture()
def toy():
    register(RecipeEntry("toy", "a BN variant defined in a test", _build, batch_independent_train=False,
                         folds="yes", layers=(LayerSpec(ToyNorm),)))
    yield
    unregister("toy")


def test_one_entry_gives_every_verb(toy):
    model = normsurgeon.load_model("normsurgeon:digits_cnn")
    from tests.util import randomize_norm_stats

    randomize_norm_stats(model)
    shape = (2, 1, 16, 16)
    res = normsurgeon.convert(model, "toy", input_shape=shape)
    toys = [m for m in res.model.modules() if isinstance(m, ToyNorm)]
    assert len(toys) == 3 and res.count("replaced") == 3 and res.path == "fx"
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(res.model(x), model(x))  # same eval function: statistics carried over

    rep = normsurgeon.inspect(res.model, input_shape=shape)
    assert [layer.type for layer in rep.layers] == ["ToyNorm"] * 3

    folded = normsurgeon.fold(res.model, input_shape=shape, verify=True)
    assert not any(isinstance(m, ToyNorm) for m in folded.model.modules()) and folded.count("folded") == 3
    torch.testing.assert_close(folded.model(x), res.model(x), rtol=1e-5, atol=1e-5)

    d = load_digits("test")
    recal = normsurgeon.recalibrate(res.model, (d.x, d.y), batch_size=64).model
    first = [m for m in recal.modules() if isinstance(m, ToyNorm)][0]
    with torch.no_grad():  # independent computation: the (unchanged) first conv's output over all the data
        feats = model[0](d.x)
    flat = feats.double().transpose(0, 1).reshape(feats.shape[1], -1)
    torch.testing.assert_close(first.running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.running_var.double(), flat.var(1, unbiased=False), rtol=1e-4, atol=1e-6)
    assert normsurgeon.recalibrate(res.model, (d.x, d.y)).count("recalibrated") == 3


def test_unregistered_recipe_is_gone(toy):
    unregister("toy")
    with pytest.raises(normsurgeon.RecipeError, match="unknown recipe 'toy'"):
        normsurgeon.convert(normsurgeon.load_model("normsurgeon:digits_cnn"), "toy")
