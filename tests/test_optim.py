"""DoPr's math against independent references: torch's own optimizers, float64 closed forms,
Newton's method on least squares, checkpoint resume, and a real 2-process DDP run."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dopr.optim import DoPr, build, warmup_cosine, warmup_cosine_factor
from dopr.optim.base_updates import adamw_update

# spawned DDP workers must import what they run: the shared pieces live in an importable module
from dopr.tests.optim_helpers import ConvNet, batches, ddp_worker, mlp, train

torch.set_num_threads(1)


def assert_params_close(a, b, rtol=1e-5, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- AP off == torch's optimizers
def test_ap_off_takes_torch_adamw_steps():
    data = batches(20, (16, 12), 5)
    ref, ours = mlp(), mlp()
    train(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6), data)
    train(ours, DoPr(ours, lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6, precondition=False), data)
    assert_params_close(ref, ours)
    assert not torch.allclose(ref[0].weight, mlp()[0].weight)  # training moved the weights


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_update_paths_take_torch_adamw_steps(fused):
    """Both of adamw_update's paths (torch's fused kernel, and the readable foreach math used where
    there is no kernel) against torch.optim.AdamW's default loop."""
    data = batches(20, (16, 12), 5)
    ref, ours = mlp(), mlp()
    train(ref, torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6), data)
    params = list(ours.parameters())
    states = [{} for _ in params]
    for x, y in data:
        ours.zero_grad()
        F.mse_loss(ours(x), y).backward()
        with torch.no_grad():
            adamw_update(params, [p.grad for p in params], states, 3e-3, (0.8, 0.99), 1e-6, 0.1, fused=fused)
    assert_params_close(ref, ours)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
# match_rms_adamw is what dopr train uses for every *muon optimizer (its 0.2 sets Muon's lr scale)
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_ap_off_takes_torch_muon_steps_on_matrices(adjust_lr_fn):
    data = batches(20, (16, 12), 5)
    ref, ours = mlp(), mlp()
    matrices = [m.weight for m in ref if isinstance(m, nn.Linear)]
    rest = [p for p in ref.parameters() if all(p is not q for q in matrices)]
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.05, momentum=0.9, adjust_lr_fn=adjust_lr_fn)
    # fused: the AdamW kernel DoPr runs on a CPU (Muon's bfloat16 rounding would amplify the last-bit
    # differences of another AdamW kernel in the biases into visible ones in the matrices)
    adamw = torch.optim.AdamW(rest, lr=0.02, weight_decay=0.05, fused=True)
    for x, y in data:
        muon.zero_grad(), adamw.zero_grad()
        F.mse_loss(ref(x), y).backward()
        muon.step(), adamw.step()
    opt = build("muon", ours, lr=0.02, weight_decay=0.05, momentum=0.9, adjust_lr_fn=adjust_lr_fn)
    assert isinstance(opt, DoPr) and not opt.precondition
    train(ours, opt, data)
    # bfloat16 Newton-Schulz: same ops in the same order, so the match is exact up to float32 rounding
    assert_params_close(ref, ours, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- AP closed form in float64
def linear_rows(layer, x):
    return x.reshape(-1, x.shape[-1])


def conv1d_rows(layer, x):
    """Patches by explicit indexing (independent of F.unfold): row (b, t) = x_pad[b, c, t*s + j*dil]."""
    p, s, dil, k = layer.padding[0], layer.stride[0], layer.dilation[0], layer.kernel_size[0]
    xp = F.pad(x, (p, p))
    length = (xp.shape[-1] - dil * (k - 1) - 1) // s + 1
    rows = [torch.stack([xp[b, :, t * s + j * dil] for j in range(k)], dim=-1).flatten()
            for b in range(x.shape[0]) for t in range(length)]
    return torch.stack(rows)


def conv2d_rows(layer, x):
    (ph, pw), (sh, sw), (kh, kw) = layer.padding, layer.stride, layer.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    oh, ow = (xp.shape[-2] - kh) // sh + 1, (xp.shape[-1] - kw) // sw + 1
    return torch.stack([xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw].flatten()
                        for b in range(x.shape[0]) for i in range(oh) for j in range(ow)])


@pytest.mark.parametrize("damping", [0.05, 1e-7])  # explicit-inverse path and float64-solve path
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_ap_matches_float64_closed_form(kind, damping):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x, rows = nn.Linear(7, 5), torch.randn(2, 10, 7) * torch.linspace(0.2, 3, 7), linear_rows
    elif kind == "conv1d":
        layer, x, rows = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), torch.randn(6, 3, 11), conv1d_rows
    else:
        layer, x, rows = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0)), torch.randn(3, 2, 5, 6), conv2d_rows
    target = torch.randn_like(layer(x))
    ref = copy.deepcopy(layer).double()
    opt = DoPr(layer, lr=1.0, base="sgd", weight_decay=0.0, damping=damping, damping_floor=0.0,
               stats="batch", precond_every=1)
    before = [p.detach().clone() for p in layer.parameters()]
    opt.zero_grad()
    for half in (slice(0, x.shape[0] // 2), slice(x.shape[0] // 2, None)):  # two accumulated micro-batches
        ((layer(x[half]) - target[half]) ** 2).sum().backward()
    opt.step()
    m = torch.cat([(b - p.detach()).reshape(layer.out_channels if kind != "linear" else 5, -1)
                   for b, p in zip(before, layer.parameters())], dim=1).double()

    ((ref(x.double()) - target.double()) ** 2).sum().backward()
    g = torch.cat([ref.weight.grad.reshape(ref.weight.shape[0], -1), ref.bias.grad[:, None]], dim=1)
    z = rows(ref, x.double())
    z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
    sigma = z.T @ z / z.shape[0]
    a = sigma + damping * sigma.trace() * torch.eye(sigma.shape[0], dtype=z.dtype)
    expected = torch.linalg.solve(a, g.T).T
    torch.testing.assert_close(m, expected, rtol=2e-4, atol=1e-5 * expected.abs().max().item())


# ---------------------------------------------------------------- Newton property
def test_newton_step_solves_least_squares_in_one_step():
    g = torch.Generator().manual_seed(0)
    n, d = 256, 16
    x = torch.randn(n, d, generator=g) * torch.logspace(-1, 1, d)  # input scales 0.1 .. 10: cond(Sigma) ~ 1e4
    y = x @ torch.randn(d, 3, generator=g) + torch.randn(3, generator=g)

    def loss(model):
        return 0.5 * ((model(x) - y) ** 2).sum(1).mean()

    def after_one_step(make_opt):
        torch.manual_seed(1)
        model = nn.Linear(d, 3)
        opt = make_opt(model)
        start = loss(model)
        opt.zero_grad()
        start.backward()
        opt.step()
        return loss(model).item() / start.item()

    newton = after_one_step(lambda m: DoPr(m, lr=1.0, base="sgd", damping=1e-9, damping_floor=0.0,
                                           weight_decay=0.0, stats="batch"))
    assert newton < 1e-6
    best_adamw = min(after_one_step(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0))
                     for lr in (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0))
    best_sgd = min(after_one_step(lambda m: DoPr(m, lr=lr, base="sgd", weight_decay=0.0, precondition=False))
                   for lr in (1e-3, 1e-2, 1e-1))
    assert best_adamw > 0.1 and best_sgd > 0.1


# ---------------------------------------------------------------- statistics
def test_ema_statistics_are_bias_corrected_weighted_averages():
    torch.manual_seed(0)
    layer = nn.Linear(4, 2, bias=False)
    opt = DoPr(layer, lr=0.0, stats="ema", stat_decay=0.9, precond_every=100)
    xs = [torch.randn(8, 4), torch.randn(8, 4) * 3]
    for x in xs:
        opt.zero_grad()
        layer(x).sum().backward()
        opt.step()
    s0, s1 = (x.T @ x / 8 for x in xs)
    state = opt.state[layer.weight]
    corrected = state["sigma_ema"] / (1 - 0.9 ** 2)
    torch.testing.assert_close(corrected, (0.9 * 0.1 * s0 + 0.1 * s1) / (1 - 0.81))
    # refreshed at step 0 from the single-step EMA, which bias correction makes exactly Sigma_0
    expected = torch.linalg.inv((s0 + 0.1 * s0.trace() * torch.eye(4)).double()).float()
    torch.testing.assert_close(state["ap_inverse"], expected, rtol=1e-5, atol=1e-6)


def test_eval_mode_and_no_grad_forwards_are_not_recorded():
    data = batches(6, (16, 12), 5)
    a, b = mlp(), mlp()
    oa = DoPr(a, lr=1e-2, stats="ema", precond_every=2)
    ob = DoPr(b, lr=1e-2, stats="ema", precond_every=2)
    train(a, oa, data)
    ema_copy = copy.deepcopy(b)  # carries copies of the hooks
    for x, y in data:
        ema_copy(torch.randn(64, 12) * 100).sum().backward()  # training mode, grad on, but not the optimized model
        b.eval()
        b(torch.randn(64, 12) * 100)  # an evaluation pass on other data
        b.train()
        with torch.no_grad():
            b(torch.randn(64, 12) * 100)  # a validation pass in training mode without grad
        ob.zero_grad()
        F.mse_loss(b(x), y).backward()
        ob.step()
    assert_params_close(a, b, rtol=0, atol=0)


def test_statistics_are_float32_under_autocast():
    torch.manual_seed(0)
    model = mlp()
    opt = DoPr(model, lr=1e-3)
    x = torch.randn(8, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    moments = opt._inputs.moments
    assert out.dtype == torch.bfloat16 and moments["2"].zz.dtype == torch.float32
    torch.testing.assert_close(moments["0"].zz, x.T @ x)


def test_zero_inputs_stay_finite():
    layer = nn.Linear(5, 3, bias=False)
    opt = DoPr(layer, lr=1e-2, base="sgd")
    opt.zero_grad()
    layer(torch.zeros(4, 5)).sum().backward()
    opt.step()
    assert torch.isfinite(layer.weight).all()


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name,kw", [("dopr-adamw", dict(stats="ema", precond_every=3)),
                                     ("dopr-muon", dict(stats="batch", precond_every=4, damping=1e-8)),
                                     ("dopr-adamuon", dict(stats="ema", precond_every=3, conv="channel")),
                                     ("dopr-signum", dict(stats="same-batch", conv="channel",
                                                          damping_mode="mean_eig"))])
def test_state_dict_round_trip_is_bit_identical(tmp_path, name, kw):
    data = batches(20, (8, 3, 8), 2)
    full = ConvNet()
    train(full, build(name, full, lr=1e-2, **kw), data)

    first = ConvNet()
    opt = build(name, first, lr=1e-2, **kw)
    train(first, opt, data[:10])
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    del first, opt

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = ConvNet(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt = build(name, resumed, lr=1e-2, **kw)
    opt.load_state_dict(ckpt["optim"])
    train(resumed, opt, data[10:])
    assert_params_close(full, resumed, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="lr"):
        DoPr(mlp(), lr=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        build("dopr-adamw", mlp(), damping=-0.1)
    with pytest.raises(ValueError, match="no trainable nn.Linear"):
        DoPr(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), lr=1e-3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build("adam", mlp())
    with pytest.raises(ValueError, match="base"):
        DoPr(mlp(), base="lion")


def test_nonfinite_gradients_and_inputs_name_the_layer_and_leave_weights_untouched():
    model = mlp()
    opt = DoPr(model, lr=1e-2)
    x, y = torch.randn(8, 12), torch.randn(8, 5)
    F.mse_loss(model(x), y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"'2\.weight'") as err:
        opt.step()
    # it says where a NaN comes from, and suggests no option that no command line exposes
    assert "check the data for non-finite values" in str(err.value) and "skip_nonfinite" not in str(err.value)
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    opt.zero_grad()
    F.mse_loss(model(x_bad), y).backward()
    with pytest.raises(FloatingPointError, match=r"'0'"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    skipping = DoPr(model, lr=1e-2, skip_nonfinite=True)
    skipping.zero_grad()
    F.mse_loss(model(x_bad), y).backward()
    skipping.step()
    assert skipping.skipped_steps == 1 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- distributed
@pytest.mark.parametrize("dopr_kw", [dict(stats="ema", precond_every=2),
                                     # each rank's rows are summed into one Sigma (the head: d x d form, where
                                     # one process takes the n x n form); SGD: Adam would turn the two forms'
                                     # last-bit differences in near-zero entries into lr-sized ones
                                     dict(stats="same-batch", conv="channel", base="sgd")])
def test_two_process_ddp_takes_the_single_process_steps(tmp_path, dopr_kw):
    import torch.multiprocessing as mp

    data = batches(5, (8, 3, 8), 2)
    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "ddp_store"), data, str(out), dopr_kw), nprocs=2, join=True)
    single = ConvNet()
    train(single, DoPr(single, lr=1e-2, **dopr_kw), data)
    ddp = ConvNet()
    ddp.load_state_dict(torch.load(out, weights_only=True))
    assert_params_close(single, ddp, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(single.c1.weight, ConvNet().c1.weight)


# ---------------------------------------------------------------- schedule
def test_warmup_cosine_schedule():
    assert warmup_cosine_factor(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine_factor(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    opt = build("dopr-muon", mlp(), lr=0.02, adamw_lr=1e-3)
    sched = warmup_cosine(opt, 0, 10)
    for _ in range(5):
        opt.step()  # no gradients: a no-op, as with torch's optimizers
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4])


def test_build_ignores_options_that_do_not_apply_and_rejects_unknown_ones():
    kw = dict(lr=1e-3, weight_decay=0.0, damping=0.3, stats="batch", momentum=0.9)
    assert isinstance(build("adamw", mlp(), **kw), torch.optim.AdamW)
    assert build("dopr-adamw", mlp(), **kw).damping == 0.3
    assert not build("muon", mlp(), **kw).precondition
    with pytest.raises(TypeError, match="dampning"):
        build("dopr-adamw", mlp(), dampning=0.1)


def test_indefinite_by_rounding_gets_jitter_and_nonsense_raises():
    from dopr.optim.preconditioner import factorize

    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    sigma = q @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, -1e-9], dtype=torch.float64)) @ q.T
    (factor,) = factorize(["layer"], [sigma], damping=0.0, floor=0.0)
    assert factor.cholesky is not None and torch.isfinite(factor.cholesky).all()
    with pytest.raises(FloatingPointError, match="'layer'"):
        factorize(["layer"], [-torch.eye(3, dtype=torch.float64)], damping=0.0, floor=0.0)


def test_discarded_optimizer_removes_its_hooks():
    import gc

    model = mlp()
    opt = DoPr(model, lr=1e-3)
    assert len(model[0]._forward_hooks) == 1
    del opt
    gc.collect()
    assert len(model[0]._forward_hooks) == 0


def test_hooks_are_attached_only_on_steps_that_record():
    """Steps that record nothing take torch's hook-free forward path; recording steps still record."""
    data = batches(7, (16, 12), 5)
    model = mlp()
    opt = DoPr(model, lr=1e-3, precond_every=3)
    attached = []
    for x, y in data:
        attached.append(len(model[0]._forward_hooks))
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if attached[-1]:
            assert set(opt._inputs.moments) == {b.stats_key for b in opt.blocks}
        else:
            assert not opt._inputs.moments
        opt.step()
    assert attached == [1, 0, 0, 1, 0, 0, 1]
    opt.remove_hooks()
    kept = opt.state[model[0].weight]["ap_inverse"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # remove_hooks is final: the schedule never re-attaches them (steps 7..9: a refresh)
            opt.zero_grad()
            F.mse_loss(model(data[0][0]), data[0][1]).backward()
            opt.step()
            assert len(model[0]._forward_hooks) == 0
    torch.testing.assert_close(opt.state[model[0].weight]["ap_inverse"], kept, rtol=0, atol=0)


def test_dopr_adamw_first_step_is_minus_lr_sign_of_the_preconditioned_gradient():
    """The whole step, not only M: Adam's first step is -lr * sign(M) elementwise. Fails if the base optimizer
    reads M's weight part (a strided column slice of [M_w | m_b]) as dense memory, as the fused kernel did."""
    from torch import nn

    from dopr.optim import build

    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randn(256, 7)
    model = nn.Sequential(nn.Linear(20, 64), nn.Mish(), nn.Linear(64, 7))
    opt = build("dopr-adamw", model, lr=1e-2, weight_decay=0.0)
    w0 = model[0].weight.detach().clone()
    ((model(x) - y) ** 2).mean().backward()
    g = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).double()
    z = torch.cat([x, torch.ones(256, 1)], 1).double()
    sigma = z.T @ z / 256
    m = g @ torch.linalg.inv(sigma + 0.1 * torch.trace(sigma) * torch.eye(21, dtype=torch.float64))
    opt.step()
    step = (model[0].weight.detach() - w0).double()
    expected = -1e-2 * torch.sign(m[:, :20])
    assert torch.nn.functional.cosine_similarity(step.flatten(), expected.flatten(), dim=0) > 0.999
