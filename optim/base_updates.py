"""Gradient-wise preconditioners (GP): the update D = GP(M) of AdamW, Muon and SGD.

Each function takes the (possibly activation-preconditioned) gradients as a separate list, so the
same code serves DoPr and its AP-off baselines. The math follows torch.optim.AdamW and
torch.optim.Muon (torch 2.13) exactly, including Muon's momentum as a lerp and its bfloat16
Newton-Schulz iteration; decoupled weight decay theta <- (1 - lr wd) theta everywhere.
"""

from __future__ import annotations

import math

import torch

# Keller Jordan's quintic Newton-Schulz coefficients, as in torch.optim.Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def adamw_update(params, grads, states, lr, betas, eps, weight_decay) -> None:
    if not params:
        return
    beta1, beta2 = betas
    for p, s in zip(params, states):
        if "exp_avg" not in s:
            s["step"] = torch.tensor(0.0)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        s["step"] += 1
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"].item() for s in states]
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**t) for t in steps])


def sgd_update(params, grads, states, lr, momentum, nesterov, weight_decay) -> None:
    for p, g, s in zip(params, grads, states):
        d = g
        if momentum:
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = g.clone()
            else:
                s["momentum_buffer"].mul_(momentum).add_(g)
            buf = s["momentum_buffer"]
            d = g.add(buf, alpha=momentum) if nesterov else buf
        p.mul_(1 - lr * weight_decay)
        p.add_(d, alpha=-lr)


def newton_schulz(m: torch.Tensor, steps: int, eps: float, coefficients=NS_COEFFICIENTS) -> torch.Tensor:
    """Approximate orthogonalization U V^T of a 2D matrix M = U S V^T, in bfloat16."""
    a, b, c = coefficients
    x = m.bfloat16()
    tall = m.shape[0] > m.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr(lr: float, shape, adjust_lr_fn: str | None) -> float:
    rows, cols = shape
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def muon_update(params, grads, states, lr, momentum, nesterov, weight_decay, ns_steps, ns_eps, adjust_lr_fn) -> None:
    """Muon on matrices; a conv weight (out, in, *k) is updated as the matrix (out, in*k)."""
    for p, g, s in zip(params, grads, states):
        g = g.reshape(p.shape[0], -1)
        if "momentum_buffer" not in s:
            s["momentum_buffer"] = torch.zeros_like(g)
        buf = s["momentum_buffer"]
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        update = newton_schulz(update, ns_steps, ns_eps)
        p.mul_(1 - lr * weight_decay)
        p.add_(update.reshape(p.shape), alpha=-muon_lr(lr, g.shape, adjust_lr_fn))
