"""Statistics of closed-loop evaluations: success rate and mean return with their confidence intervals, rank
correlation.

Success over n episodes is a binomial proportion; the Wilson score interval stays inside [0, 1] and
keeps its coverage at small n and at rates near 0 or 1, where the normal approximation fails
(what matters when 50 episodes decide between two optimizers). A mean return (locomotion tasks' primary
metric) or a mean over a few training seeds gets Student's t interval: its standard deviation is estimated
from the same few samples.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(n_success: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if n < 0 or n_success < 0 or n_success > n:
        raise ValueError(f"wilson_interval: need 0 <= n_success <= n, got n_success={n_success}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = n_success / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at p = 0 or 1 the exact bound is 0 or 1; the formula only reaches it up to rounding
    lo = 0.0 if n_success == 0 else max(0.0, center - half)
    hi = 1.0 if n_success == n else min(1.0, center + half)
    return lo, hi


def t975(df: int) -> float:
    """97.5% quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def t80(df: int) -> float:
    """80% quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.8, df))


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); NaN where there are too few values."""
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean with its 95% Student's t interval; NaN bounds for fewer than 2 values."""
    m, sd = mean_sd(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return m, m - half, m + half


@dataclass
class SuccessStats:
    """Summary of a set of episodes (each a dict with success, steps, return, time_to_success)."""

    n_episodes: int
    n_success: int
    success_rate: float
    ci_low: float
    ci_high: float
    mean_return: float
    return_ci_low: float  # 95% t interval of the mean return over the episodes
    return_ci_high: float
    mean_length: float
    time_to_success: float | None  # mean steps to the first success, over the successful episodes
    n_errors: int  # episodes that ended in a worker fault (counted as failures)


def success_stats(episodes: list[dict]) -> SuccessStats:
    n = len(episodes)
    k = sum(1 for e in episodes if e.get("success"))
    lo, hi = wilson_interval(k, n)
    mean_return, return_lo, return_hi = t_interval([float(e["return"]) for e in episodes])
    tts = [e["time_to_success"] for e in episodes if e.get("success") and e.get("time_to_success") is not None]
    return SuccessStats(
        n_episodes=n,
        n_success=k,
        success_rate=k / n if n else float("nan"),
        ci_low=lo,
        ci_high=hi,
        mean_return=mean_return,
        return_ci_low=return_lo,
        return_ci_high=return_hi,
        mean_length=float(np.mean([e["steps"] for e in episodes])) if n else float("nan"),
        time_to_success=float(np.mean(tts)) if tts else None,
        n_errors=sum(1 for e in episodes if e.get("error")),
    )


EXACT_SPEARMAN_MAX_N = 8  # up to 8! = 40320 orderings: the exact permutation p-value costs milliseconds


def spearman(x, y) -> tuple[float, float, int]:
    """Spearman rank correlation of paired samples: (rho, two-sided p-value, n).

    Ties get average ranks. NaN pairs are dropped; rho is NaN when fewer than 3 pairs remain or
    either side is constant (no ranking to compare). The p-value is exact (every ordering of y
    against x) for n <= EXACT_SPEARMAN_MAX_N, where scipy's t approximation is far off (it gives
    p = 0 for a perfect rank order of 4 runs, whose exact p is 2/24); beyond that, scipy's.
    """
    from scipy.stats import rankdata, spearmanr

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"spearman: x and y differ in shape, {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(len(x))
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan"), n
    res = spearmanr(x, y)
    rho = float(res.statistic)
    if n > EXACT_SPEARMAN_MAX_N:
        return rho, float(res.pvalue), n
    rx, ry = rankdata(x), rankdata(y)
    orderings = ry[np.array(list(itertools.permutations(range(n))))]  # (n!, n): every pairing of y with x
    rx, orderings = rx - rx.mean(), orderings - ry.mean()
    rhos = orderings @ rx / np.sqrt((rx @ rx) * (orderings[0] @ orderings[0]))
    return rho, float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12)), n
