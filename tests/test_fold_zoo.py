"""Zoo models (random weights, randomized BN statistics): fold is exact to 1e-5 in float32 and
leaves no BatchNorm. The full torchvision sweep with timings is benchmarks/deploy_fold_zoo.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normsurgeon
from tests.util import randomize_norm_stats

CASES = [
    # (spec, input shape, expected path)
    ("torchvision:resnet18", (2, 3, 64, 64), "fx"),
    ("torchvision:mobilenet_v3_small", (2, 3, 64, 64), "fx"),
    ("torchvision:efficientnet_b0", (2, 3, 64, 64), "fx"),
    ("torchvision:shufflenet_v2_x0_5", (2, 3, 64, 64), "fx"),
    ("timm:efficientnet_b0", (2, 3, 64, 64), "fx"),  # BatchNormAct2d
    ("timm:nf_resnet26", (2, 3, 64, 64), "fx"),  # ScaledStdConv2d
    ("timm:resnetv2_50x1_bit", (1, 3, 64, 64), "fx"),  # StdConv2d + GroupNorm
    ("timm:levit_128s", (1, 3, 224, 224), "fx"),  # BN over Linear tokens
    ("timm:mobilevit_xxs", (1, 3, 256, 256), "module-swap"),  # fx cannot trace it
]


@pytest.mark.slow
@pytest.mark.parametrize("spec, shape, path", CASES, ids=[c[0] for c in CASES])
def test_zoo_fold_exact(spec, shape, path):
    model = randomize_norm_stats(normsurgeon.load_model(spec))
    res = normsurgeon.fold(model, input_shape=shape)
    assert res.path == path
    assert res.verification.max_rel_error <= 1e-5, res.verification
    left = [n for n, m in res.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not left
    # independent check on a second input the pass never saw
    x = torch.randn(shape) * 2 + 0.5
    with torch.no_grad():
        ref, got = model(x), res.model(x)
    assert ((ref - got).abs().max() / ref.abs().max()).item() <= 1e-5
    # every BN of the source is accounted for in the report
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bns <= {c.target for c in res.changes}


def test_densenet121_no_bn_and_62_leftover_affines_reported():
    """torch.fx's own fuse leaves 62 of DenseNet-121's BN layers (after concats); fold leaves no BN,
    62 per-channel affines, each with its reason."""
    model = randomize_norm_stats(normsurgeon.load_model("torchvision:densenet121"))
    res = normsurgeon.fold(model, input_shape=(1, 3, 32, 32))
    summary = res.summary()
    assert summary == {"folded": 59, "affine": 62}
    assert all("cat()" in c.detail for c in res.changes if c.action == "affine")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in res.model.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), res.model(x)
    assert ((ref - got).abs().max() / ref.abs().max()).item() <= 1e-5
