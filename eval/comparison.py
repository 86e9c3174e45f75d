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
from dopr.eval.results import EpisodeCount

# z_{0.8}: with z_{0.975}, a difference of z_{0.975} + z_{0.8} standard errors is found 80% of the time at the 5% level
Z_80 = 0.8416


@dataclass
class SeedResult:
    """One training seed's final checkpoint."""

    seed: int | str  # a training seed; "task/seed" when units of several tasks are pooled
    success: dict[int, bool]  # episode seed -> success
    val_loss: float | None
    step: int
    count: EpisodeCount | None = None  # episodes asked and done (results.json); None: not from a results file

    @property
    def success_rate(self) -> float:
        return sum(self.success.values()) / max(1, len(self.success))


@dataclass
class Cell:
    task: str
    policy: str
    configuration: str  # the compared configuration's name (e.g. "dopr-adamw:damping=0.3"), else the optimizer
    seeds: list[SeedResult] = field(default_factory=list)
    optimizer: str = ""  # dopr.optim.build's name, e.g. "dopr-adamw"
    lr: float | None = None

    def counts_note(self, usual: int | None) -> str | None:
        """Why this cell's numbers do not stand next to the others as they are: an incomplete evaluation, or
        episode counts that differ between its seeds or from `usual` (the table's common count); else None."""
        counts = {s.seed: s.count or EpisodeCount(len(s.success), len(s.success)) for s in self.seeds}
        done = {c.done for c in counts.values()}
        if all(c.complete for c in counts.values()) and (len(done) == 1 and (usual is None or done == {usual})):
            return None
        return ", ".join(f"seed {seed}: {c} episodes" for seed, c in counts.items())

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


def t975(df: int) -> float:
    """97.5% quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def t80(df: int) -> float:
    """80% quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.8, df))


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
    diffs: list[float]  # per training seed
    # smallest difference this design detects with 80% power at the 5% level: (t_0.975 + t_0.8) standard
    # errors of the mean paired difference, with Student's t for the few seeds a design has
    mde: float

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
        se = sd / math.sqrt(n)
        lo, hi = m - t975(n - 1) * se, m + t975(n - 1) * se
        mde = (t975(n - 1) + t80(n - 1)) * se
    else:
        lo = hi = float("nan")
        # one seed: only the episode noise is known; the discordant pairs give its standard error
        se = math.sqrt(max(only_t + only_b, 1)) / max(n_eps[0], 1)
        mde = (Z_95 + Z_80) * se
    return PairedComparison(treatment.configuration, baseline.configuration, n, min(n_eps), m, lo, hi, only_t, only_b,
                            diffs, mde)


def cells_from_runs(run_dirs: list[str]) -> list[Cell]:
    """One cell per (task, policy, configuration) from the runs' evaluated final checkpoints, in run order."""
    from dopr.eval.runs import is_run_folder, read_run_record

    cells: dict[tuple, Cell] = {}
    for run_dir in run_dirs:
        if not is_run_folder(run_dir):
            continue  # not (yet) a `dopr train` run
        run = read_run_record(run_dir)
        final = run.final
        if final is None or final.results is None:
            continue  # not finished, or not evaluated
        key = (final.meta.task, run.policy, run.configuration)
        cell = cells.setdefault(key, Cell(*key, optimizer=run.optim, lr=run.lr))
        success = {int(e["seed"]): bool(e["success"]) for e in final.episodes()}
        cell.seeds.append(SeedResult(seed=run.seed, success=success, val_loss=final.meta.val_loss,
                                     step=final.meta.step, count=EpisodeCount.of(final.results)))
    return list(cells.values())


def dopr_pairs(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """Each DoPr cell with its base optimizer's cell of the same task and policy: the one trained at
    the same lr (DoPr keeps its base's tuned lr), else the first one."""
    pairs = []
    for t in cells:
        if not t.optimizer.startswith("dopr-"):
            continue
        base_key = (t.task, t.policy, t.optimizer.removeprefix("dopr-"))
        bases = [b for b in cells if (b.task, b.policy, b.optimizer) == base_key]
        if bases:
            pairs.append((t, next((b for b in bases if b.lr == t.lr), bases[0])))
    return pairs


def _pooled_over_tasks(pairs: list[tuple[Cell, Cell]]) -> list[tuple[str, str, Cell, Cell]]:
    """Where the same two configurations were compared on several tasks: one pair of cells whose
    units are (task, training seed), for an overall answer across tasks."""
    groups: dict[tuple, list] = {}
    for t, b in pairs:
        groups.setdefault((t.policy, t.configuration, b.configuration), []).append((t, b))

    def units(c: Cell) -> list[SeedResult]:
        return [SeedResult(f"{c.task}/{s.seed}", s.success, s.val_loss, s.step, s.count) for s in c.seeds]

    out = []
    for (policy, t_name, b_name), members in groups.items():
        tasks = sorted({t.task for t, _ in members})
        if len(tasks) < 2:
            continue
        name = "+".join(tasks)
        out.append((name, policy, Cell(name, policy, t_name, [s for t, _ in members for s in units(t)]),
                    Cell(name, policy, b_name, [s for _, b in members for s in units(b)])))
    return out


def comparisons(cells: list[Cell]) -> list[tuple[str, str, PairedComparison]]:
    """(task, policy, comparison) for every DoPr cell against its base, then the rows pooled over tasks."""
    pairs = dopr_pairs(cells)
    compared = sorted(((t.task, t.policy, t, b) for t, b in pairs), key=lambda x: (x[0], x[1], x[2].configuration))
    out = []
    for task, policy, t, b in compared + _pooled_over_tasks(pairs):
        p = paired_comparison(t, b)
        if p is not None:
            out.append((task, policy, p))
    return out


MARK = "†"  # a cell whose episode counts differ or whose evaluation is incomplete


def usual_episode_count(cells: list[Cell]) -> int | None:
    """The most common episode count of the complete evaluations in the table (None when there are none)."""
    from collections import Counter

    counts = Counter(s.count.done if s.count else len(s.success) for c in cells for s in c.seeds
                     if s.count is None or s.count.complete)
    return counts.most_common(1)[0][0] if counts else None


def comparison_table(cells: list[Cell]) -> str:
    """Markdown: one row per cell, then one row per paired comparison of a DoPr configuration with its
    base optimizer (and, where the same two were compared on several tasks, one row over all of them).
    A cell with an incomplete evaluation, or other episode counts than the rest, is marked (MARK) and said
    in a note under the table; so is every comparison it enters."""
    usual = usual_episode_count(cells)
    notes = {(c.task, c.policy, c.configuration): c.counts_note(usual) for c in cells}
    lines = ["| task | policy | optimizer | seeds | episodes/seed | success mean (sd) | pooled 95% CI "
             "| val loss mean (sd) |",
             "|---|---|---|---|---|---|---|---|"]
    marked = []
    for c in sorted(cells, key=lambda c: (c.task, c.policy, c.configuration)):
        rm, rs = mean_sd(c.rates())
        vm, vs = mean_sd(c.val_losses())
        k, n, lo, hi = c.pooled_interval()
        eps = sorted({len(s.success) for s in c.seeds})
        note = notes[(c.task, c.policy, c.configuration)]
        mark = f" {MARK}" if note else ""
        if note:
            marked.append(f"{c.task} {c.policy} {c.configuration}: {note}")
        lines.append(f"| {c.task} | {c.policy} | {c.configuration} | {len(c.seeds)} | "
                     f"{'-'.join(map(str, eps))}{mark} | {rm:.3f} ({rs:.3f}){mark} | "
                     f"{lo:.3f}-{hi:.3f}{mark} | {vm:.4g} ({vs:.2g}) |")
    unequal = {name for name, note in notes.items() if note}
    rows = []
    for task, policy, p in comparisons(cells):
        # pooled rows name several tasks: marked when any of theirs is
        mark = f" {MARK}" if any(key[1:] in ((policy, p.treatment), (policy, p.baseline)) and key[0] in task.split("+")
                                 for key in unequal) else ""
        rows.append(f"| {task} | {policy} | {p.treatment} - {p.baseline} | {p.n_seeds} | {p.diff:+.3f}{mark} | "
                    f"{p.ci_low:+.3f} to {p.ci_high:+.3f} | {p.only_treatment} / {p.only_baseline} | "
                    f"{p.mde:.3f} | {p.verdict()}{mark} |")
    if rows:
        lines += ["", "| task | policy | paired difference | seeds | mean diff | 95% CI (t over seeds) | "
                  "episodes only treatment / only baseline solved | detectable difference (80% power) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|", *rows]
    if marked:
        rest = f" than the rest ({usual} episodes per seed)" if usual is not None else ""
        lines += ["", f"{MARK} Not comparable as it stands: these cells have an incomplete evaluation or other episode "
                  f"counts{rest}; an interrupted evaluation finishes its short "
                  "(often successful) episodes first, so its rate runs high. Run the evaluation again to complete "
                  "it.", *[f"- {m}" for m in marked]]
    return "\n".join(lines)
