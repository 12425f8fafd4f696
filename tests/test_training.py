"""Training helpers: ENorm interleaved with SGD, revisited-BN groups, gamma-toward-1 decay, PN groups."""
import copy

import torch
from torch import nn

import normsurgeon
from normsurgeon.training import (EqualizeCallback, gamma_decay_penalty, proxy_norm_param_groups,
                                  revisited_param_groups)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 3)).double()


def _train_step(model, opt, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_callback_preserves_function_in_train_mode_and_rescales_momentum():
    model = _cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cb = EqualizeCallback(model, opt, every=2, c=1.1, input_shape=(2, 1, 8, 8))
    assert [p.producer for p in cb.plan.pairs] == ["0", "3", "6"]  # conv->relu->conv, BN affine, conv->...->fc
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    _train_step(model, opt, x, y)
    assert cb.step() is False  # every=2
    _train_step(model, opt, x, y)
    params = dict(model.named_parameters())
    w_before = {k: p.detach().clone() for k, p in params.items()}
    buf_before = {k: opt.state[p]["momentum_buffer"].clone() for k, p in params.items()}
    ref = copy.deepcopy(model)
    out_before = ref(x)  # train mode: BN uses batch statistics
    assert cb.step() is True
    assert torch.allclose(model(x), out_before, rtol=1e-10, atol=1e-12)
    changed = 0
    for k, p in params.items():
        ratio = p.detach() / w_before[k]
        mask = w_before[k].abs() > 1e-12
        # the buffer is divided by exactly the factor its weight was multiplied by
        assert torch.allclose((opt.state[p]["momentum_buffer"] * ratio)[mask], buf_before[k][mask], rtol=1e-9, atol=1e-14)
        changed += int(not torch.allclose(ratio[mask], torch.ones_like(ratio[mask])))
    assert changed >= 6


def test_callback_rescales_adam_moments_and_skip_last_matches_reference():
    model = _cnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    _train_step(model, opt, x, y)
    cb = EqualizeCallback(model, opt, c=1.0, skip_last=True, input_shape=(2, 1, 8, 8))
    assert len(cb.pairs) == len(cb.plan.pairs) - 1
    w = model[0].weight.detach().clone()
    m1, m2 = opt.state[model[0].weight]["exp_avg"].clone(), opt.state[model[0].weight]["exp_avg_sq"].clone()
    fc = model[10].weight.detach().clone()
    cb.step()
    s = model[0].weight.detach() / w
    assert torch.allclose(opt.state[model[0].weight]["exp_avg"] * s, m1)
    assert torch.allclose(opt.state[model[0].weight]["exp_avg_sq"] * s * s, m2)
    assert torch.equal(model[10].weight, fc)  # last pair (conv 6 -> fc) left alone


def test_revisited_param_groups():
    model = normsurgeon.convert(_cnn(), "gn", input_shape=(2, 1, 8, 8), input_norm=True).model
    groups = revisited_param_groups(model, lr=0.1, weight_decay=1e-4)
    by_id = {id(p): g for g in groups for p in g["params"]}
    gn = model.get_submodule("3")
    assert by_id[id(gn.weight)]["lr"] == 0.1 / 100 and by_id[id(gn.weight)]["weight_decay"] == 0
    assert by_id[id(model.input_norm.weight)]["lr"] == 0.1 / 100
    assert by_id[id(gn.bias)]["lr"] == 0.1 and by_id[id(gn.bias)]["weight_decay"] == 0
    conv = model.get_submodule("0")
    assert by_id[id(conv.weight)]["weight_decay"] == 1e-4 and by_id[id(conv.bias)]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])


def test_gamma_decay_penalty_is_half_squared_distance_to_one():
    model = _cnn()
    bn = model[3]
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 8))
        bn.bias.copy_(torch.linspace(-1, 1, 8))
    expected = 0.5 * ((bn.weight - 1) ** 2).sum() + 0.5 * (bn.bias ** 2).sum()
    pen = gamma_decay_penalty(model, 0.01)
    assert torch.allclose(pen, 0.01 * expected)
    pen.backward()
    assert torch.allclose(bn.weight.grad, 0.01 * (bn.weight - 1))


def test_proxy_norm_param_groups():
    model = normsurgeon.convert(_cnn(), "gn+pn", input_shape=(2, 1, 8, 8)).model
    groups = proxy_norm_param_groups(model, weight_decay=1e-4, proxy_weight_decay=1e-5)
    pn = next(m for m in model.modules() if type(m).__name__ == "ProxyNorm")
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert by_id[id(pn.proxy_scale)] == 1e-5 and by_id[id(pn.proxy_shift)] == 1e-5
    assert by_id[id(pn.affine_source.weight)] == 0 and by_id[id(pn.affine_source.bias)] == 0
    assert by_id[id(model.get_submodule("0").weight)] == 1e-4
    assert len(by_id) == len(list(model.parameters()))
