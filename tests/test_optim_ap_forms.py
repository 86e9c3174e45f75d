"""DoPr's AP forms against float64 closed forms computed here independently: same-batch statistics
(the d x d solve and the n x n Woodbury form), both damping modes, the channel form of Conv1d/Conv2d,
nn.MultiheadAttention and attention built from nn.Linear."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dopr.optim.dopr as dopr_module
from dopr.optim import DoPr

torch.set_num_threads(1)


def damped_inverse(sigma: torch.Tensor, gamma: float, mode: str) -> torch.Tensor:
    d = sigma.shape[0]
    delta = gamma * sigma.trace() / (d if mode == "mean_eig" else 1)
    return torch.linalg.inv(sigma + delta * torch.eye(d, dtype=sigma.dtype))


def with_ones(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)


def sgd_step_update(model, opt, loss_fn, micro_batches=1):
    """The update one DoPr(base='sgd', lr=1, wd=0) step makes: -M, per parameter."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    for part in range(micro_batches):
        loss_fn(part).backward()
    opt.step()
    return {n: (before[n] - p.detach()).double() for n, p in model.named_parameters()}


def close(actual, expected, rtol=2e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------- same-batch Linear: d x d and n x n forms
def spy_dual_forms(monkeypatch) -> list[str]:
    calls = []
    for name, tag in (("precondition_dual", "gradient"), ("precondition_dual_outputs", "outputs")):
        real = getattr(dopr_module, name)
        monkeypatch.setattr(dopr_module, name, lambda *a, real=real, tag=tag: calls.append(tag) or real(*a))
    return calls


@pytest.mark.parametrize("mode", ["trace", "mean_eig"])
# narrower than the batch (solve), wider (Woodbury), and wider than the first micro-batch only (kept rows folded)
@pytest.mark.parametrize("d_in,rows", [(6, 40), (48, 10), (30, 40)])
def test_same_batch_linear_matches_closed_form(d_in, rows, mode, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(d_in, 5)
    x = torch.randn(rows, d_in) * torch.linspace(0.2, 3, d_in)
    target = torch.randn(rows, 5)
    dual_calls = spy_dual_forms(monkeypatch)
    ref = copy.deepcopy(layer).double()
    gamma = 1e-2 if mode == "trace" else 0.5  # both bound the condition number by ~100 at d = 49
    opt = DoPr(layer, lr=1.0, base="sgd", weight_decay=0.0, damping=gamma, damping_mode=mode, damping_floor=0.0,
               stats="same-batch")
    halves = (slice(0, rows // 2), slice(rows // 2, None))  # two accumulated micro-batches: one Sigma
    update = sgd_step_update(layer, opt, lambda i: ((layer(x[halves[i]]) - target[halves[i]]) ** 2).sum(), 2)
    # wider than the batch: the n x n form, with the recorded output gradients (one product instead of two)
    assert dual_calls == (["outputs"] if d_in + 1 > rows else [])

    ((ref(x.double()) - target.double()) ** 2).sum().backward()
    z = with_ones(x.double())
    g = torch.cat([ref.weight.grad, ref.bias.grad[:, None]], dim=1)
    expected = g @ damped_inverse(z.T @ z / rows, gamma, mode)
    close(torch.cat([update["weight"], update["bias"][:, None]], dim=1), expected)


@pytest.mark.parametrize("penalty", [0.0, 0.3])
def test_same_batch_uses_each_steps_own_batch_and_the_gradient_as_it_is(penalty, monkeypatch):
    """Step 2's update uses step 2's Sigma (not step 1's); the n x n form preconditions the clipped gradient
    (c Delta^T Z: the output-gradient form with the scale c) and a gradient with a weight penalty added (not of
    that form: the general Woodbury form)."""
    torch.manual_seed(0)
    layer = nn.Linear(30, 4)
    opt = DoPr(layer, lr=1.0, base="sgd", weight_decay=0.0, damping=1e-2, stats="same-batch")
    dual_calls = spy_dual_forms(monkeypatch)
    xs = [torch.randn(8, 30), torch.randn(8, 30) * torch.linspace(0.1, 4, 30)]
    for x in xs:
        before = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().clone()
        opt.zero_grad()
        (layer(x).square().sum() + penalty * layer.weight.square().sum()).backward()
        g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).double()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.5)
        opt.step()
        z = with_ones(x.double())
        expected = (g * 0.5 / g.norm()) @ damped_inverse(z.T @ z / 8, 1e-2, "trace")
        after = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()
        close((before - after).double(), expected)
    assert dual_calls == ["gradient" if penalty else "outputs"] * 2


def test_mean_eig_damping_means_the_same_at_every_width():
    """gamma in units of the mean eigenvalue: isotropic inputs get M = g / (1 + gamma) at any width."""
    for width in (8, 64):
        layer = nn.Linear(width, 3, bias=False)
        x = torch.linalg.qr(torch.randn(4 * width, width))[0] * math.sqrt(4 * width)  # Sigma = I exactly
        opt = DoPr(layer, lr=1.0, base="sgd", weight_decay=0.0, damping=0.5, damping_mode="mean_eig",
                   damping_floor=0.0, stats="same-batch")
        update = sgd_step_update(layer, opt, lambda _: layer(x).sum())
        g = torch.ones(3, 1) * x.sum(0)
        close(update["weight"], g.double() / 1.5)


# ---------------------------------------------------------------- convolutions: the channel form
def channel_closed_form(conv, x, g_w, g_b, gamma):
    """[m_j | m_b,j] = [g_j | g_b] Sigma~_c^-1 for every tap j (Sigma~_c over all (output position, tap) reads
    of the zero-padded input, homogeneous coordinate 1); the bias moves by sum_j m_b,j."""
    two_d = isinstance(conv, nn.Conv2d)
    if not two_d:  # a 1D signal as an image of height 1
        x, g_w = x[:, :, None], g_w[:, :, None]
    (kh, kw) = g_w.shape[-2:]
    pads = conv.padding if two_d else (0, conv.padding[0])
    strides = conv.stride if two_d else (1, conv.stride[0])
    dils = conv.dilation if two_d else (1, conv.dilation[0])
    xp = F.pad(x, (pads[1], pads[1], pads[0], pads[0]))
    oh = (xp.shape[-2] - dils[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[-1] - dils[1] * (kw - 1) - 1) // strides[1] + 1
    reads = [xp[b, :, i * strides[0] + a * dils[0], j * strides[1] + c * dils[1]]
             for b in range(x.shape[0]) for i in range(oh) for j in range(ow) for a in range(kh) for c in range(kw)]
    z = with_ones(torch.stack(reads))
    inv = damped_inverse(z.T @ z / z.shape[0], gamma, "trace")
    m_w, m_b = torch.zeros_like(g_w), torch.zeros_like(g_b)
    for a in range(kh):
        for c in range(kw):
            m = torch.cat([g_w[:, :, a, c], g_b[:, None]], dim=1) @ inv
            m_w[:, :, a, c], m_b = m[:, :-1], m_b + m[:, -1]
    return (m_w if two_d else m_w[:, :, 0]), m_b


@pytest.mark.parametrize("stats", ["same-batch", "batch"])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_channel_form_matches_closed_form(kind, stats):
    torch.manual_seed(0)
    if kind == "conv1d":
        conv, x = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), torch.randn(4, 3, 11)
    else:
        conv, x = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1)), torch.randn(3, 2, 5, 7)
    x = x + 0.5  # a non-zero mean: the homogeneous coordinate couples to the channels
    target = torch.randn_like(conv(x))
    ref = copy.deepcopy(conv).double()
    opt = DoPr(conv, lr=1.0, base="sgd", weight_decay=0.0, damping=0.05, damping_floor=0.0, stats=stats,
               conv="channel")
    update = sgd_step_update(conv, opt, lambda _: ((conv(x) - target) ** 2).sum())
    ((ref(x.double()) - target.double()) ** 2).sum().backward()
    m_w, m_b = channel_closed_form(ref, x.double(), ref.weight.grad, ref.bias.grad, 0.05)
    close(update["weight"], m_w)
    close(update["bias"], m_b)


def test_channel_form_factors_channels_only():
    """The channel form's statistics are (C+1)^2, the patch form's (C k + 1)^2."""
    conv = nn.Conv1d(8, 8, 5, padding=2)
    shapes = {}
    for form in ("channel", "patch"):
        opt = DoPr(conv, lr=1e-3, conv=form, stats="batch")
        conv(torch.randn(2, 8, 16)).sum().backward()
        opt.step()
        shapes[form] = tuple(opt.state[conv.weight]["ap_inverse"].shape)
        opt.remove_hooks()
    assert shapes == {"channel": (9, 9), "patch": (41, 41)}


# ---------------------------------------------------------------- attention
class TinyTransformer(nn.Module):
    """nn.MultiheadAttention (self-attention) and an attention built from nn.Linear modules."""

    def __init__(self, e=8, heads=2):
        super().__init__()
        self.heads = heads
        self.mha = nn.MultiheadAttention(e, heads, batch_first=True)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x):
        h = x + self.mha(x, x, x, need_weights=False)[0]
        return h + self.o(attend(self.q(h), self.k(h), self.v(h), self.heads))


def attend(q, k, v, heads):
    b, t, e = q.shape
    q, k, v = (y.reshape(b, t, heads, e // heads).transpose(1, 2) for y in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, t, e)


def test_attention_projections_match_closed_form():
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(3, 5, 8)
    target = torch.randn(3, 5, 8)
    ref = copy.deepcopy(model).double()
    gamma = 0.02
    opt = DoPr(model, lr=1.0, base="sgd", weight_decay=0.0, damping=gamma, damping_floor=0.0, stats="same-batch")
    assert [b.name for b in opt.blocks] == ["mha:q", "mha:k", "mha:v", "mha:out", "q", "k", "v", "o"]
    update = sgd_step_update(model, opt, lambda _: ((model(x) - target) ** 2).sum())

    xd = x.double()
    ((ref(xd) - target.double()) ** 2).sum().backward()

    def expected(weight, bias, inputs, rows=slice(None)):
        z = with_ones(inputs.reshape(-1, inputs.shape[-1]))
        g = torch.cat([weight.grad[rows], bias.grad[rows, None]], dim=1)
        return g @ damped_inverse(z.T @ z / z.shape[0], gamma, "trace")

    mha, e = ref.mha, 8
    for i in range(3):  # q, k, v rows of in_proj: all three read x
        rows = slice(i * e, (i + 1) * e)
        m = expected(mha.in_proj_weight, mha.in_proj_bias, xd, rows)
        close(update["mha.in_proj_weight"][rows], m[:, :-1])
        close(update["mha.in_proj_bias"][rows], m[:, -1])
    q, k, v = (xd @ w.T + b for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)))
    m = expected(mha.out_proj.weight, mha.out_proj.bias, attend(q, k, v, 2))
    close(update["mha.out_proj.weight"], m[:, :-1])
    close(update["mha.out_proj.bias"], m[:, -1])

    h = xd + ref.mha(xd, xd, xd, need_weights=False)[0]
    for name in ("q", "k", "v"):
        m = expected(getattr(ref, name).weight, getattr(ref, name).bias, h)
        close(update[f"{name}.weight"], m[:, :-1])
    m = expected(ref.o.weight, ref.o.bias, attend(ref.q(h), ref.k(h), ref.v(h), 2))
    close(update["o.weight"], m[:, :-1])
    close(update["o.bias"], m[:, -1])


def test_cross_attention_gets_each_inputs_sigma_and_stored_factors_work():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 2)  # (T, B, E) layout
    query, memory = torch.randn(4, 2, 6), torch.randn(7, 2, 6) * 3 + 1
    opt = DoPr(mha, lr=1.0, base="sgd", weight_decay=0.0, damping=0.1, damping_floor=0.0, stats="ema",
               precond_every=1)
    ref = copy.deepcopy(mha).double()
    update = sgd_step_update(mha, opt, lambda _: mha(query, memory, memory)[0].square().sum())
    ref(query.double(), memory.double(), memory.double())[0].square().sum().backward()
    for i, inputs in enumerate((query, memory, memory)):
        rows = slice(i * 6, (i + 1) * 6)
        z = with_ones(inputs.double().reshape(-1, 6))
        g = torch.cat([ref.in_proj_weight.grad[rows], ref.in_proj_bias.grad[rows, None]], dim=1)
        m = g @ damped_inverse(z.T @ z / z.shape[0], 0.1, "trace")
        close(update["in_proj_weight"][rows], m[:, :-1])
        close(update["in_proj_bias"][rows], m[:, -1])


def test_attention_state_round_trip_is_bit_identical(tmp_path):
    """The q, k, v blocks' statistics and factors (suffixed keys on one weight) survive a checkpoint."""
    data = [(torch.randn(2, 5, 8), torch.randn(2, 5, 8)) for _ in range(6)]

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    torch.manual_seed(0)
    full = TinyTransformer()
    run(full, DoPr(full, lr=1e-2, stats="ema", precond_every=2), data)
    torch.manual_seed(0)
    first = TinyTransformer()
    opt = DoPr(first, lr=1e-2, stats="ema", precond_every=2)
    run(first, opt, data[:3])
    assert {"ap_inverse:q", "sigma_ema:v"} <= set(opt.state[first.mha.in_proj_weight])
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = TinyTransformer()
    resumed.load_state_dict(ckpt["model"])
    opt = DoPr(resumed, lr=1e-2, stats="ema", precond_every=2)
    opt.load_state_dict(ckpt["optim"])
    assert opt.state[resumed.mha.in_proj_weight]["sigma_count:q"].device.type == "cpu"
    run(resumed, opt, data[3:])
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
