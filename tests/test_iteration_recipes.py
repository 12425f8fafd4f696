"""cbn, bkn and iebn on a real zoo model: batch-2 training steps, batch independence at eval (and the
declared batch dependence in training), exact fold, save/load, (N, C) features."""
import copy

import pytest
import torch

import normsurgeon
from normsurgeon.graph.verify import batch_independence_error, output_error
from normsurgeon.layers import BatchKalmanNorm, CrossIterationBatchNorm, IEBNGate, InstanceEnhancedBatchNorm
from normsurgeon.recipes import get_entry, parse_recipe
from tests.util import randomize_norm_stats

SHAPE = (2, 3, 32, 32)
RECIPES = ["cbn", "bkn", "iebn"]
LAYER = {"cbn": CrossIterationBatchNorm, "bkn": BatchKalmanNorm, "iebn": InstanceEnhancedBatchNorm}




def opts(recipe: str) -> dict:
    """cbn's burn-in off (the other recipes read no such option, and convert refuses options a
    recipe does not read)."""
    return {"cbn_burnin": 0} if recipe.startswith("cbn") else {}


@pytest.fixture(scope="module")
def resnet():
    """timm's small test ResNet: basic and bottleneck blocks, 15 BNs, each after a conv."""
    return randomize_norm_stats(normsurgeon.load_model("timm:test_resnet"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_trains_at_batch_two_batch_independent_at_eval_and_folds(resnet, recipe):
    res = normsurgeon.convert(resnet, recipe, input_shape=SHAPE, **opts(recipe))
    model = res.model
    assert res.count("replaced") == 15 and sum(isinstance(m, LAYER[recipe]) for m in model.modules()) == 15
    if recipe == "cbn":
        assert all(m.producer is not None for m in model.modules() if isinstance(m, CrossIterationBatchNorm))
    x = torch.randn(4, 3, 32, 32)
    assert not get_entry(recipe).batch_independent_train
    assert batch_independence_error(model, x, train=True) > 1e-3  # declared: batch statistics in training
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(3):  # cbn: the window fills with compensated iterations
        xb = torch.randn(SHAPE)
        loss = torch.nn.functional.cross_entropy(model(xb), torch.tensor([1, 7]))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    model.eval()
    assert batch_independence_error(model, x) <= 1e-5
    double = copy.deepcopy(model).double()
    folded = normsurgeon.fold(copy.deepcopy(double), input_shape=SHAPE)
    xd = torch.randn(SHAPE, dtype=torch.float64)
    assert output_error(double(xd), folded.model.eval()(xd))[1] <= 1e-10
    assert not any(isinstance(m, LAYER[recipe]) for m in folded.model.modules())
    gates = sum(isinstance(m, IEBNGate) for m in folded.model.modules())
    assert gates == (15 if recipe == "iebn" else 0)  # what stays: the per-instance gate
    assert get_entry(recipe).folds == ("partial" if recipe == "iebn" else "yes")


@pytest.mark.parametrize("recipe", RECIPES)
def test_conversion_keeps_the_bn_models_eval_function(resnet, recipe):
    model = normsurgeon.convert(resnet, recipe, input_shape=SHAPE).model.eval()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert output_error(resnet.eval()(x), model(x))[1] <= 1e-5
    if recipe == "cbn":
        dup = copy.deepcopy(model)  # a copy links each CBN to the copy's conv
        assert dup.bn1.producer is dup.get_submodule("conv1.6")


@pytest.mark.parametrize("recipe", ["cbn", "iebn"])
def test_save_load_round_trip(tmp_path, recipe):
    conv = normsurgeon.convert(normsurgeon.load_model("timm:test_resnet"), recipe, input_shape=SHAPE,
                               **opts(recipe)).model
    conv.train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(SHAPE)
    for _ in range(2):
        conv(x).square().mean().backward()
        opt.step()
    conv.eval()
    back = normsurgeon.load_model(str(normsurgeon.save_model(conv, tmp_path / "m.pt")))
    assert output_error(conv(x), back(x))[1] <= 1e-6
    if recipe == "cbn":
        mods = {id(m) for m in back.modules()}  # the compensation links are rebuilt by the replayed convert
        cbns = [m for m in back.modules() if isinstance(m, CrossIterationBatchNorm)]
        assert len(cbns) == 15 and all(id(m.producer) in mods for m in cbns)
        assert back.bn1.producer is back.get_submodule("conv1.6")


@pytest.mark.parametrize("recipe", RECIPES)
def test_batchnorm1d_features(recipe):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 4))
    model = normsurgeon.convert(mlp, recipe, input_shape=(2, 6), **opts(recipe)).model.train()
    for _ in range(3):
        out = model(torch.randn(2, 6))
        out.square().sum().backward()
        assert torch.isfinite(out).all() and out.std() > 0
    assert batch_independence_error(model, torch.randn(3, 6)) <= 1e-5


def test_recipe_arguments():
    assert parse_recipe("cbn").arg == 8 and parse_recipe("cbn:3").arg == 3
    from normsurgeon.errors import RecipeError

    for bad in ("cbn:0", "cbn:x", "bkn:2", "iebn:1"):
        with pytest.raises(RecipeError):
            parse_recipe(bad)


@pytest.mark.parametrize("recipe", RECIPES)
def test_revisited_init_reaches_the_new_layers(recipe):
    from normsurgeon.calibrate.digits_cnn import digits_cnn

    res = normsurgeon.convert(digits_cnn(), recipe, input_shape=(2, 1, 16, 16), init="revisited")
    layers = [m for m in res.model.modules() if isinstance(m, LAYER[recipe])]
    assert res.count("initialized") == 3 and len(layers) == 3
    assert all(torch.all(m.weight == 0.1) and torch.all(m.bias == 0) for m in layers)
