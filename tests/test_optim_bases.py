"""Signum and AdaMuon (the paper's other two bases) against their published formulas, written out here,
and every optimizer name of dopr.optim.build."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dopr.optim import OPTIMIZERS, DoPr, build
from dopr.optim.base_updates import newton_schulz
from dopr.tests.optim_helpers import batches, mlp, train

torch.set_num_threads(1)


def test_signum_takes_sign_of_momentum_steps():
    data = batches(6, (16, 12), 5)
    ours, ref = mlp(), mlp()
    lr, beta, wd = 1e-2, 0.8, 0.1
    train(ours, build("signum", ours, lr=lr, momentum=beta, weight_decay=wd), data)
    momenta = [torch.zeros_like(p) for p in ref.parameters()]
    for x, y in data:
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p, m in zip(ref.parameters(), momenta):
                m.mul_(beta).add_((1 - beta) * p.grad)  # m <- b m + (1 - b) g
                p.mul_(1 - lr * wd).sub_(lr * torch.sign(m))  # theta <- (1 - lr wd) theta - lr sign(m)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_adamuon_follows_the_published_algorithm():
    """Si, Zhang, Shen 2025 (arXiv 2507.11005), Algorithm 1, on a matrix; AdamW on the bias."""
    torch.manual_seed(0)
    ours, ref = nn.Linear(12, 6), nn.Linear(12, 6)
    ref.load_state_dict(ours.state_dict())
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.05
    opt = build("adamuon", ours, lr=lr, momentum=b1, betas=(0.9, b2), eps=eps, weight_decay=wd)
    bias_opt = torch.optim.AdamW([ref.bias], lr=lr, betas=(0.9, b2), eps=eps, weight_decay=wd, fused=True)
    m, v = torch.zeros(6, 12), torch.zeros(6, 12)
    data = batches(5, (16, 12), 6)
    train(ours, opt, data)
    for t, (x, y) in enumerate(data, start=1):
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        g = ref.weight.grad
        with torch.no_grad():
            m = b1 * m + (1 - b1) * g
            u = (1 - b1) * g + b1 * m  # Nesterov
            o = newton_schulz(torch.sign(u), 5, 1e-7).float()  # sign-stabilized, then orthogonalized
            v = b2 * v + (1 - b2) * o * o
            o_hat = o / (torch.sqrt(v / (1 - b2**t)) + eps)
            ref.weight.mul_(1 - lr * wd).sub_(lr * 0.2 * math.sqrt(6 * 12) / (o_hat.norm() + eps) * o_hat)
        bias_opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-5, atol=1e-6)
    rms = (ours.weight - nn.Linear(12, 6).weight).pow(2).mean().sqrt()
    assert rms > 0  # it moved


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_name_builds_and_trains(name):
    data = batches(4, (16, 12), 5)
    model = mlp()
    opt = build(name, model, lr=1e-3, stats="same-batch", damping_mode="mean_eig", damping=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, data)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if name != "adamw":
        assert isinstance(opt, DoPr) and opt.precondition == name.startswith("dopr-")
        assert opt.param_groups[0]["kind"] == name.removeprefix("dopr-")


def test_dopr_bases_apply_their_update_to_the_preconditioned_gradient():
    """dopr-signum's step is -lr sign(momentum of M), with M = g (Sigma + delta I)^-1 of the same batch."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=False)
    x = torch.randn(32, 5) * torch.tensor([0.1, 1, 3, 1, 0.5]) + 0.3
    w0 = layer.weight.detach().clone()
    opt = build("dopr-signum", layer, lr=0.1, momentum=0.0, weight_decay=0.0, stats="same-batch", damping=1e-3)
    (layer(x) * torch.randn(32, 3)).sum().backward()
    g = layer.weight.grad.double()
    opt.step()
    sigma = (x.T @ x / 32).double()
    m = g @ torch.linalg.inv(sigma + 1e-3 * sigma.trace() * torch.eye(5, dtype=torch.float64))
    assert not torch.equal(torch.sign(m), torch.sign(g))  # AP changes the signs here: the test can tell
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.1 * torch.sign(m).float())


def test_bad_names_and_options_raise_clear_errors():
    with pytest.raises(ValueError, match="stats must be one of"):
        DoPr(mlp(), stats="same")
    with pytest.raises(ValueError, match="damping_mode"):
        DoPr(mlp(), damping_mode="mean")
    with pytest.raises(ValueError, match="conv must be one of"):
        DoPr(mlp(), conv="taps")
    with pytest.raises(ValueError, match="momentum"):
        DoPr(mlp(), base="signum", momentum=1.0)
