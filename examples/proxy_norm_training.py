"""Train-from-scratch recipe: GroupNorm + proxy norm with the "revisited" init, a few SGD steps at
batch size 2, then fold for deployment -- the folded model has no proxy-norm computation left.

    python examples/proxy_norm_training.py
"""
import torch

import normsurgeon
from normsurgeon.layers import ProxyNorm
from normsurgeon.training import proxy_norm_param_groups

model = normsurgeon.load_model("timm:test_resnet")
result = normsurgeon.convert(model, "gn+pn", input_shape=(2, 3, 32, 32), init="revisited")
net = result.model.train()
print(f"converted: {result.summary()}, {sum(isinstance(m, ProxyNorm) for m in net.modules())} ProxyNorm layers")

opt = torch.optim.SGD(proxy_norm_param_groups(net, weight_decay=5e-5, proxy_weight_decay=5e-5), lr=0.05, momentum=0.9)
g = torch.Generator().manual_seed(0)
for step in range(5):
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, 1000, (2,), generator=g)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.3f}")

folded = normsurgeon.fold(net.eval(), input_shape=(2, 3, 32, 32))
left = sum(isinstance(m, ProxyNorm) for m in folded.model.modules())
print(f"fold: {folded.summary()}, max rel error {folded.verification.max_rel_error:.1e}, ProxyNorm left: {left}")
