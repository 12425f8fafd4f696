"""Every seed recipe on a real zoo model: trains at batch 2, batch-independent where claimed, folds
exactly where docs/recipes.md says, survives save/load."""
import copy

import pytest
import torch

import normsurgeon
from normsurgeon.graph.verify import batch_independence_error, output_error
from normsurgeon.layers import (BatchGroupNorm, ChannelGroupNorm, EstimatedBatchNorm, GeneralizedBatchNorm,
                                GhostBatchNorm, ProxyNorm)
from normsurgeon.recipes import get_entry
from tests.util import randomize_norm_stats

SHAPE = (2, 3, 32, 32)
SEED_RECIPES = ["ln+pn", "gn+pn", "gn+ws+pn", "bcn", "bgn", "ghost", "bn+gn", "ebn"]


@pytest.fixture(scope="module")
def resnet():
    """timm's small test ResNet: basic and bottleneck blocks, avg-pool downsamples, 15 BNs."""
    return randomize_norm_stats(normsurgeon.load_model("timm:test_resnet"))


@pytest.mark.parametrize("recipe", SEED_RECIPES)
def test_trains_at_batch_two_and_is_batch_independent(resnet, recipe):
    res = normsurgeon.convert(resnet, recipe, input_shape=SHAPE)
    model = res.model
    assert res.count("replaced") == 15
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(SHAPE)
    assert batch_independence_error(model, x) <= 1e-5
    if get_entry(recipe).batch_independent_train:
        assert batch_independence_error(model, x, train=True) <= 1e-5
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.isfinite(model(x)).all()


def test_batch_dependent_recipes_are_declared_so(resnet):
    """The train-mode claims are not vacuous: these do mix samples in training."""
    x = torch.randn(4, 3, 32, 32)
    for recipe in ("bgn", "ghost:2", "bn+gn", "ebn"):
        model = normsurgeon.convert(resnet, recipe, input_shape=SHAPE).model
        assert not get_entry(recipe.split(":")[0]).batch_independent_train
        assert batch_independence_error(model, x, train=True) > 1e-3


def test_proxy_norm_placement_on_resnet(resnet):
    model = normsurgeon.convert(resnet, "ln+pn", input_shape=SHAPE).model
    pns = dict(model.named_children())
    # PN right after the stem's activations, using that norm's own gamma/beta
    assert pns["bn1_post"].affine_source is model.bn1
    assert pns["conv1_1_post"].affine_source is model.conv1.get_submodule("1")
    assert model.bn1.num_groups == 1 and model.bn1.eps == 1e-3 and model.bn1.bias is not None
    # the last norm of a residual branch (feeds the add, no activation): scale, no shift, no PN
    for name in ("layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn3", "layer2.0.downsample.2"):
        assert model.get_submodule(name).bias is None and model.get_submodule(name).weight is not None
    assert not any(isinstance(m, ProxyNorm) and m.affine_source is model.get_submodule("layer1.0.bn2") for m in model.modules())


def test_proxy_norm_after_fused_activation_in_timm():
    model = normsurgeon.load_model("timm:test_efficientnet")  # BatchNormAct2d with a fused SiLU
    res = normsurgeon.convert(model, "gn+pn", input_shape=SHAPE)
    from normsurgeon.layers import NormAct

    posts = [m.post for m in res.model.modules() if isinstance(m, NormAct) and isinstance(m.post, ProxyNorm)]
    fused = [m for m in model.modules() if type(m).__name__ == "BatchNormAct2d" and type(m.act).__name__ == "SiLU"]
    assert len(posts) == len(fused) > 0
    assert all(type(p.activation).__name__ == "SiLU" for p in posts)
    assert all(p.affine_source.weight.numel() == p.num_features for p in posts)


@pytest.mark.parametrize("recipe,left", [
    ("ln+pn", ()), ("gn+ws+pn", ()), ("bcn", (ChannelGroupNorm,)), ("bgn", ()), ("ghost", ()),
    ("bn+gn", ()), ("ebn:0", ()), ("ebn:0.5", (GeneralizedBatchNorm,)),
])
def test_fold_removes_what_methods_says(resnet, recipe, left):
    model = normsurgeon.convert(copy.deepcopy(resnet).double(), recipe, input_shape=SHAPE).model
    res = normsurgeon.fold(model, input_shape=SHAPE)
    assert res.verification.max_rel_error <= 1e-5
    x = torch.randn(SHAPE, dtype=torch.float64)
    model.eval()
    assert output_error(model(x), res.model.eval()(x))[1] <= 1e-10
    kinds = (ProxyNorm, EstimatedBatchNorm, BatchGroupNorm, GhostBatchNorm, GeneralizedBatchNorm, ChannelGroupNorm)
    remaining = {type(m) for m in res.model.modules() if isinstance(m, kinds)}
    assert remaining == set(left)


@pytest.mark.parametrize("recipe", ["ln+pn", "bcn"])
def test_save_load_round_trip_with_a_spec(tmp_path, recipe):
    model = normsurgeon.load_model("timm:test_resnet")
    conv = normsurgeon.convert(model, recipe, input_shape=SHAPE).model
    conv.train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(SHAPE)
    conv(x).square().mean().backward()
    opt.step()  # gamma, beta, proxy parameters and running estimates move away from their init
    conv.eval()
    path = normsurgeon.save_model(conv, tmp_path / "m.pt")
    back = normsurgeon.load_model(str(path))
    assert output_error(conv(x), back(x))[1] <= 1e-6
    if recipe == "ln+pn":
        pn = back.bn1_post
        assert pn.affine_source is back.bn1  # the link survives rebuild + load_state_dict


@pytest.mark.parametrize("recipe", SEED_RECIPES)
def test_batchnorm1d_on_features(recipe):
    """(N, C) inputs: no spatial axes, groups chosen from channels (opacus#567)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = normsurgeon.convert(mlp, recipe, input_shape=(2, 6)).model.train()
    x = torch.randn(2, 6)
    out = model(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and out.std() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert batch_independence_error(model, x) <= 1e-5


def test_recipe_arguments_are_checked():
    from normsurgeon.errors import RecipeError
    from normsurgeon.recipes import parse_recipe

    assert parse_recipe("ebn").arg == 0.5 and parse_recipe("ebn:0.2").arg == 0.2
    assert parse_recipe("ghost").arg == 16 and parse_recipe("bgn:8").arg == 8
    for bad in ("ebn:1.5", "ghost:0", "bgn:x", "bn+gn:4", "ln+pn:2"):
        with pytest.raises(RecipeError):
            parse_recipe(bad)
