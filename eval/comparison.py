"""Cells of an optimizer comparison and the paired test between DoPr and its base optimizer.

A cell is (task, policy, optimizer): several training seeds, each evaluated on the same episode
seeds. Two sources of noise decide what a design can detect: the binomial noise of a finite number
of episodes, and the spread between training seeds. Pairing removes neither, but pairing by
training seed and episode seed removes the part both optimizers share (a hard initial state is
hard for both), so the comparison is made on per-seed differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dopr.eval.metrics import Z_95, wilson_interval

# z_{0.975} + z_{0.8}: a difference of this many standard errors is found 80% of the time at the 5% level
Z_POWER_80 = Z_95 + 0.8416


@dataclass
class SeedResult:
    """One training seed's final checkpoint."""

    seed: int
    success: dict[int, bool]  # episode seed -> success
    val_loss: float | None
    step: int

    @property
    def success_rate(self) -> float:
        return sum(self.success.values()) / max(1, len(self.success))


@dataclass
class Cell:
    task: str
    policy: str
    optim: str
    seeds: list[SeedResult] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [s.success_rate for s in self.seeds]

    def val_losses(self) -> list[float]:
        return [s.val_loss for s in self.seeds if s.val_loss is not None]

    def pooled_interval(self) -> tuple[int, int, float, float]:
        """Successes and episodes over all seeds, with the 95% Wilson interval of the pooled rate."""
        k = sum(sum(s.success.values()) for s in self.seeds)
        n = sum(len(s.success) for s in self.seeds)
        lo, hi = wilson_interval(k, n) if n else (float("nan"), float("nan"))
        return k, n, lo, hi


def mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


# two-sided 97.5% quantiles of Student's t for small degrees of freedom (df >= 30: normal)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060}


def t975(df: int) -> float:
    if df >= 30:
        return Z_95
    return _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]


@dataclass
class PairedComparison:
    """`treatment` minus `baseline` success rate, paired by training seed and episode seed."""

    treatment: str
    baseline: str
    n_seeds: int
    n_episodes: int  # common episodes per seed
    diff: float  # mean over seeds of the per-seed success-rate difference
    ci_low: float
    ci_high: float
    # episodes (over all seeds) that only one optimizer solved: the discordant pairs of McNemar's test
    only_treatment: int
    only_baseline: int
    mde: float  # smallest difference this design detects with 80% power at the 5% level

    def verdict(self) -> str:
        if math.isnan(self.ci_low):
            return "too few seeds to tell"
        if self.ci_low > 0:
            return f"{self.treatment} higher"
        if self.ci_high < 0:
            return f"{self.baseline} higher"
        return "no detectable difference"


def paired_comparison(treatment: Cell, baseline: Cell) -> PairedComparison | None:
    by_seed = {s.seed: s for s in baseline.seeds}
    diffs, only_t, only_b, n_eps = [], 0, 0, []
    for s in treatment.seeds:
        b = by_seed.get(s.seed)
        if b is None:
            continue
        common = sorted(set(s.success) & set(b.success))
        if not common:
            continue
        n_eps.append(len(common))
        diffs.append(sum(s.success[e] - b.success[e] for e in common) / len(common))
        only_t += sum(s.success[e] and not b.success[e] for e in common)
        only_b += sum(b.success[e] and not s.success[e] for e in common)
    if not diffs:
        return None
    m, sd = mean_sd(diffs)
    n = len(diffs)
    if n > 1:
        half = t975(n - 1) * sd / math.sqrt(n)
        lo, hi = m - half, m + half
        se = sd / math.sqrt(n)
    else:
        lo = hi = float("nan")
        # one seed: only the episode noise is known; the discordant pairs give its standard error
        se = math.sqrt(max(only_t + only_b, 1)) / max(n_eps[0], 1)
    return PairedComparison(treatment.optim, baseline.optim, n, min(n_eps), m, lo, hi, only_t, only_b,
                            mde=Z_POWER_80 * se)


def comparison_table(cells: list[Cell], pairs: list[tuple[str, str]]) -> str:
    """Markdown: one row per cell, then one row per paired comparison."""
    lines = ["| task | policy | optimizer | seeds | episodes/seed | success mean (sd) | pooled 95% CI | val loss mean (sd) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        rm, rs = mean_sd(c.rates())
        vm, vs = mean_sd(c.val_losses())
        k, n, lo, hi = c.pooled_interval()
        eps = n // max(1, len(c.seeds))
        lines.append(f"| {c.task} | {c.policy} | {c.optim} | {len(c.seeds)} | {eps} | {rm:.3f} ({rs:.3f}) | "
                     f"{lo:.3f}-{hi:.3f} | {vm:.4g} ({vs:.2g}) |")
    index = {(c.task, c.policy, c.optim): c for c in cells}
    rows = []
    for task, policy in sorted({(c.task, c.policy) for c in cells}):
        for t, b in pairs:
            if (task, policy, t) in index and (task, policy, b) in index:
                p = paired_comparison(index[(task, policy, t)], index[(task, policy, b)])
                if p is not None:
                    rows.append(f"| {task} | {policy} | {t} - {b} | {p.n_seeds} | {p.diff:+.3f} | "
                                f"{p.ci_low:+.3f} to {p.ci_high:+.3f} | {p.only_treatment} / {p.only_baseline} | "
                                f"{p.mde:.3f} | {p.verdict()} |")
    if rows:
        lines += ["", "| task | policy | paired difference | seeds | mean diff | 95% CI (t over seeds) | "
                  "episodes only treatment / only baseline solved | detectable difference (80% power) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|", *rows]
    return "\n".join(lines)
