"""Activation-wise preconditioning (AP): M = g (Sigma + gamma tr(Sigma) I)^-1, solved stably.

The damped matrix A = Sigma + delta I with delta = gamma tr(Sigma) + floor has eigenvalues in
[delta, tr(Sigma) + delta], so its condition number is at most (tr + delta) / delta. When that bound
is moderate (the default damping gives about 11) the inverse, formed from a Cholesky factor (float32
up to a bound of 1e3, float64 beyond), is as accurate as a solve and costs one matrix product per
step; when it is large (damping near 0) the float64 factor is kept and every step solves with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Up to this condition bound a float32 factorization loses at most ~1e3 * 6e-8 relative accuracy
# (and runs about twice as fast as float64 on a CPU); beyond it the factorization is float64.
MAX_COND_FOR_FLOAT32 = 1e3
# Above this condition bound a float32 explicit inverse would lose too many digits: solve in float64.
MAX_COND_FOR_INVERSE = 1e4
JITTER_TRIES = 8  # relative jitter 1e-10 .. 1e-3 of the mean diagonal


@dataclass
class Factor:
    """The refreshed preconditioner of one layer: a float32 inverse, or a float64 Cholesky factor."""

    inverse: torch.Tensor | None = None
    cholesky: torch.Tensor | None = None


def factorize(names: list[str], sigmas: list[torch.Tensor], damping: float, floor: float) -> list[Factor]:
    """Factor A = Sigma + (damping tr(Sigma) + floor) I for every layer; equal sizes are batched."""
    factors: list[Factor | None] = [None] * len(sigmas)
    by_size: dict[int, list[int]] = {}
    for i, s in enumerate(sigmas):
        by_size.setdefault(s.shape[0], []).append(i)
    for idx in by_size.values():
        sig = torch.stack([sigmas[i] for i in idx]).float()
        trace = sig.diagonal(dim1=-2, dim2=-1).sum(-1)
        delta = damping * trace + floor
        if ((trace + delta) / delta).max() > MAX_COND_FOR_FLOAT32:
            sig, trace, delta = sig.double(), trace.double(), delta.double()
        eye = torch.eye(sig.shape[-1], dtype=sig.dtype, device=sig.device)
        # A = Sigma + delta I in place (the stack is a copy; the jitter fallback re-reads the caller's Sigma)
        sig.diagonal(dim1=-2, dim2=-1).add_(delta[:, None])
        chol, info = torch.linalg.cholesky_ex(sig)
        for j in (info != 0).nonzero().flatten().tolist() if info.any() else ():  # A indefinite by rounding: jitter
            original = sigmas[idx[j]].float().to(sig.dtype)
            chol[j], delta[j] = _cholesky_with_jitter(names[idx[j]], original, delta[j], trace[j], eye)
        explicit = ((trace + delta) / delta <= MAX_COND_FOR_INVERSE).tolist()
        inverse = _inverse(chol).float() if all(explicit) else None
        for j, i in enumerate(idx):
            if inverse is not None:
                factors[i] = Factor(inverse=inverse[j])
            elif explicit[j]:
                factors[i] = Factor(inverse=_inverse(chol[j]).float())
            else:
                factors[i] = Factor(cholesky=chol[j].double())
    return factors


def _inverse(chol: torch.Tensor) -> torch.Tensor:
    """A^-1 from A's lower Cholesky factor L. LAPACK reads L^T (a free view) as the upper factor
    about 10% faster than L itself (no reordering copy), with the same accuracy."""
    return torch.cholesky_inverse(chol.mT, upper=True)


def _cholesky_with_jitter(name, sig, delta, trace, eye):
    scale = max(float(trace) / sig.shape[-1], 1e-12)
    for t in range(JITTER_TRIES):
        jitter = scale * 10.0 ** (t - 10)
        chol, info = torch.linalg.cholesky_ex(sig + (delta + jitter) * eye)
        if info == 0:
            return chol, delta + jitter
    raise FloatingPointError(
        f"DoPr: the input covariance of layer '{name}' is not positive semidefinite even with jitter "
        f"{jitter:.2e} (trace {float(trace):.3e}); raise `damping` or check the layer's inputs"
    )


def precondition(g_w: torch.Tensor, g_b: torch.Tensor | None, factor: Factor):
    """M = [g_w | g_b] A^-1 for a weight gradient g_w (out, fan_in) and bias gradient g_b (out,).

    `factor.inverse` must already have g_w's dtype (the optimizer casts it once per refresh, not per step).
    """
    d = g_w.shape[1]
    if factor.inverse is not None:
        p = factor.inverse
        if g_b is None:
            return g_w @ p, None
        # one product with the bias as a column: ~7% faster than g_w P[:d, :d] plus a rank-1 update
        g = torch.cat([g_w, g_b[:, None]], dim=1)
        return g @ p[:, :d], g @ p[d]  # p is symmetric: its row d is its column d, contiguous
    g = g_w if g_b is None else torch.cat([g_w, g_b[:, None]], dim=1)
    m = torch.cholesky_solve(g.T.to(torch.float64), factor.cholesky).T.to(g_w.dtype)
    return (m, None) if g_b is None else (m[:, :d].contiguous(), m[:, d].contiguous())
