"""Cells of an optimizer comparison and the paired test between DoPr and its base optimizer.

A cell is (task, policy, optimizer): several training seeds, each evaluated on the same episode
seeds. Two sources of noise decide what a design can detect: the episode noise of a finite number
of episodes, and the spread between training seeds. Pairing removes neither, but pairing by
training seed and episode seed removes the part both optimizers share (a hard initial state is
hard for both), so the comparison is made on per-seed differences.

A cell is compared by its task's primary metric (dopr.envs.primary_metric): the success rate, or for the
locomotion tasks the mean return. Each seed stands by its final checkpoint and, where runs were evaluated
at several checkpoints, also by its best one: the checkpoint with the highest metric among that run's own
complete evaluations. Both arms get the same optimistic pick, so the paired difference of best checkpoints
is fair between them, but it runs higher than a final checkpoint's would for either.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

from dopr.eval.metrics import Z_95, mean_sd, t80, t975, t_interval, wilson_interval
from dopr.eval.results import EpisodeCount

# z_{0.8}: with z_{0.975}, a difference of z_{0.975} + z_{0.8} standard errors is found 80% of the time at the 5% level
Z_80 = 0.8416
METRICS = ("success", "return")  # what a task's cells are compared by (dopr.envs.primary_metric)
CHECKPOINTS = ("final", "best")  # which checkpoint of each run stands for it
VALUE_FORMAT = {"success": ".3f", "return": ".2f"}


@dataclass
class SeedResult:
    """One training seed's evaluated checkpoint: its final one, or its best one over training."""

    seed: int | str  # a training seed; "task/seed" when units of several tasks are pooled
    success: dict[int, bool]  # episode seed -> success
    val_loss: float | None
    step: int
    count: EpisodeCount | None = None  # episodes asked and done (results.json); None: not from a results file
    returns: dict[int, float] = field(default_factory=dict)  # episode seed -> return
    # a best checkpoint: the steps whose complete evaluations it was picked among, and the steps whose evaluation
    # is incomplete (left out of the pick); both empty for a final checkpoint
    candidates: tuple[int, ...] = ()
    incomplete_steps: tuple[int, ...] = ()

    def outcomes(self, metric: str) -> dict[int, float]:
        """Episode seed -> the episode's value of `metric`: its return, or 1.0/0.0 for success."""
        return self.returns if metric == "return" else {e: float(s) for e, s in self.success.items()}

    def mean(self, metric: str) -> float:
        values = self.outcomes(metric)
        return sum(values.values()) / max(1, len(values))

    @property
    def success_rate(self) -> float:
        return self.mean("success")


@dataclass
class Cell:
    task: str
    policy: str
    configuration: str  # the compared configuration's name (e.g. "dopr-adamw:damping=0.3"), else the optimizer
    seeds: list[SeedResult] = field(default_factory=list)  # each run's final checkpoint
    optimizer: str = ""  # dopr.optim.build's name, e.g. "dopr-adamw"
    lr: float | None = None
    metric: str = "success"  # the task's primary metric: "success" or "return"
    best: list[SeedResult] = field(default_factory=list)  # each run's best checkpoint (best_checkpoint)

    def at(self, checkpoint: str) -> "Cell":
        """This cell with its runs standing by their "final" or their "best" checkpoints."""
        return self if checkpoint == "final" else replace(self, seeds=self.best, best=[])

    def counts_note(self, usual: int | None, usual_steps: tuple[int, ...] | None = None) -> str | None:
        """Why this cell's numbers do not stand next to the others as they are: an incomplete evaluation, or
        episode counts that differ between its seeds or from `usual` (the table's common count), or a best
        checkpoint picked with an incomplete evaluation left out or among other steps than `usual_steps`
        (the table's common ones); else None."""
        counts = {s.seed: s.count or EpisodeCount(len(s.success), len(s.success)) for s in self.seeds}
        done = {c.done for c in counts.values()}
        problems = []
        if not all(c.complete for c in counts.values()) or len(done) != 1 or (usual is not None and done != {usual}):
            problems += [f"seed {seed}: {c} episodes" for seed, c in counts.items()]
        for s in self.seeds:
            if s.incomplete_steps or (usual_steps is not None and s.candidates != usual_steps):
                left_out = (f", the incomplete evaluation at step {_steps(s.incomplete_steps)} left out"
                            if s.incomplete_steps else "")
                problems.append(f"seed {s.seed}: best among steps {_steps(s.candidates) or 'none'}{left_out}")
        return ", ".join(problems) or None

    def values(self) -> list[float]:
        """Each seed's mean of the cell's metric (success rate or mean return)."""
        return [s.mean(self.metric) for s in self.seeds]

    def val_losses(self) -> list[float]:
        return [s.val_loss for s in self.seeds if s.val_loss is not None]

    def pooled_interval(self) -> tuple[float, float]:
        """The 95% interval of the metric over all seeds' episodes pooled: Wilson's for the success rate, Student's
        t for the mean return."""
        pooled = [v for s in self.seeds for v in s.outcomes(self.metric).values()]
        if not pooled:
            return float("nan"), float("nan")
        if self.metric == "return":
            return t_interval(pooled)[1:]
        return wilson_interval(round(sum(pooled)), len(pooled))


def _steps(steps: tuple[int, ...]) -> str:
    return ", ".join(map(str, steps))


@dataclass
class PairedComparison:
    """`treatment` minus `baseline` in the cells' metric, paired by training seed and episode seed."""

    treatment: str
    baseline: str
    n_seeds: int
    n_episodes: int  # common episodes per seed
    diff: float  # mean over seeds of the per-seed difference of success rates or mean returns
    ci_low: float
    ci_high: float
    # episodes (over all seeds) that only one optimizer solved: the discordant pairs of McNemar's test
    # (success only; None for return)
    only_treatment: int | None
    only_baseline: int | None
    diffs: list[float]  # per training seed
    # smallest difference this design detects with 80% power at the 5% level: (t_0.975 + t_0.8) standard
    # errors of the mean paired difference, with Student's t for the few seeds a design has
    mde: float
    metric: str = "success"

    def verdict(self) -> str:
        if math.isnan(self.ci_low):
            return "too few seeds to tell"
        if self.ci_low > 0:
            return f"{self.treatment} higher"
        if self.ci_high < 0:
            return f"{self.baseline} higher"
        return "no detectable difference"


def _one_seed_standard_error(episode_diffs: list[float], metric: str) -> float:
    """With one seed only the episode noise is known: the standard error of the seed's mean paired difference."""
    if metric == "success":  # from the discordant pairs, at least one (an all-agreeing design still has noise)
        return math.sqrt(max(sum(d != 0 for d in episode_diffs), 1)) / len(episode_diffs)
    return mean_sd(episode_diffs)[1] / math.sqrt(len(episode_diffs))


def paired_comparison(treatment: Cell, baseline: Cell) -> PairedComparison | None:
    metric = treatment.metric
    by_seed = {s.seed: s for s in baseline.seeds}
    diffs, episode_diffs = [], []  # per seed: the mean difference, and the per-episode ones
    for s in treatment.seeds:
        b = by_seed.get(s.seed)
        if b is None:
            continue
        t_values, b_values = s.outcomes(metric), b.outcomes(metric)
        common = sorted(set(t_values) & set(b_values))
        if not common:
            continue
        episode_diffs.append([t_values[e] - b_values[e] for e in common])
        diffs.append(sum(episode_diffs[-1]) / len(common))
    if not diffs:
        return None
    only_t = only_b = None
    if metric == "success":
        only_t = sum(d > 0 for seed in episode_diffs for d in seed)
        only_b = sum(d < 0 for seed in episode_diffs for d in seed)
    m, lo, hi = t_interval(diffs)
    n = len(diffs)
    if n > 1:
        mde = (t975(n - 1) + t80(n - 1)) * mean_sd(diffs)[1] / math.sqrt(n)
    else:
        mde = (Z_95 + Z_80) * _one_seed_standard_error(episode_diffs[0], metric)
    return PairedComparison(treatment.configuration, baseline.configuration, n, min(map(len, episode_diffs)), m, lo,
                            hi, only_t, only_b, diffs, mde, metric)


def seed_result(seed: int, ckpt, results: dict) -> SeedResult:
    """A run's evaluated checkpoint (a dopr.eval.runs.CheckpointRecord and its results.json) as a seed's result."""
    episodes = ckpt.episodes()
    return SeedResult(seed=seed, success={int(e["seed"]): bool(e["success"]) for e in episodes},
                      val_loss=ckpt.meta.val_loss, step=ckpt.meta.step, count=EpisodeCount.of(results),
                      returns={int(e["seed"]): float(e["return"]) for e in episodes})


def best_checkpoint(run, metric: str) -> SeedResult | None:
    """The run's (dopr.eval.runs.RunRecord) checkpoint with the highest mean `metric` among its complete
    evaluations; a tie goes to the later step. An incomplete evaluation is left out of the pick (it finishes its
    short episodes first, so its numbers are biased) and recorded with it. A run without a complete evaluation
    stands by its (incomplete) final one, so that its cell is marked; None when that was not evaluated either."""
    evaluated = [(ckpt, ckpt.results) for ckpt in run.evaluated()]
    complete = [seed_result(run.seed, ckpt, res) for ckpt, res in evaluated if EpisodeCount.of(res).complete]
    incomplete = tuple(ckpt.meta.step for ckpt, res in evaluated if not EpisodeCount.of(res).complete)
    if complete:
        best = max(complete, key=lambda s: (s.mean(metric), s.step))
    elif run.final is not None and run.final.results is not None:
        best = seed_result(run.seed, run.final, run.final.results)
    else:
        return None
    return replace(best, candidates=tuple(s.step for s in complete), incomplete_steps=incomplete)


def cells_from_runs(run_dirs: list[str]) -> list[Cell]:
    """One cell per (task, policy, configuration) from the runs' evaluated final checkpoints (and their best
    checkpoints over training), in run order."""
    from dopr.envs import primary_metric
    from dopr.eval.runs import is_run_folder, read_run_record

    cells: dict[tuple, Cell] = {}
    for run_dir in run_dirs:
        if not is_run_folder(run_dir):
            continue  # not (yet) a `dopr train` run
        run = read_run_record(run_dir)
        final = run.final
        results = final.results if final is not None else None
        if results is None:
            continue  # not finished, or not evaluated
        key = (final.meta.task, run.policy, run.configuration)
        cell = cells.setdefault(key, Cell(*key, optimizer=run.optim, lr=run.lr,
                                          metric=primary_metric(final.meta.task)))
        cell.seeds.append(seed_result(run.seed, final, results))
        cell.best.append(best_checkpoint(run, cell.metric))
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
    """Where the same two configurations were compared on several success tasks: one pair of cells whose
    units are (task, training seed), for an overall answer across tasks. Return tasks are not pooled: their
    returns differ in scale, so a mean over them would be the largest-scale task's."""
    groups: dict[tuple, list] = {}
    for t, b in pairs:
        if t.metric == "success":
            groups.setdefault((t.policy, t.configuration, b.configuration), []).append((t, b))

    def units(c: Cell) -> list[SeedResult]:
        return [replace(s, seed=f"{c.task}/{s.seed}") for s in c.seeds]

    out = []
    for (policy, t_name, b_name), members in groups.items():
        tasks = sorted({t.task for t, _ in members})
        if len(tasks) < 2:
            continue
        name = "+".join(tasks)
        out.append((name, policy, Cell(name, policy, t_name, [s for t, _ in members for s in units(t)]),
                    Cell(name, policy, b_name, [s for _, b in members for s in units(b)])))
    return out


def comparisons(cells: list[Cell], checkpoint: str = "final") -> list[tuple[str, str, PairedComparison]]:
    """(task, policy, comparison) for every DoPr cell against its base, then the rows pooled over tasks; each run
    standing by its `checkpoint` ("final" or "best")."""
    pairs = [(t.at(checkpoint), b.at(checkpoint)) for t, b in dopr_pairs(cells)]
    compared = sorted(((t.task, t.policy, t, b) for t, b in pairs), key=lambda x: (x[0], x[1], x[2].configuration))
    out = []
    for task, policy, t, b in compared + _pooled_over_tasks(pairs):
        p = paired_comparison(t, b)
        if p is not None:
            out.append((task, policy, p))
    return out


def evaluated_at_several_steps(cells: list[Cell]) -> bool:
    """Whether any run was evaluated at more than one checkpoint, so that its best checkpoint may not be its final."""
    return any(len(s.candidates) + len(s.incomplete_steps) > 1 for c in cells for s in c.best)


def checkpoints_shown(cells: list[Cell]) -> tuple[str, ...]:
    """("final", "best") where runs were evaluated at several checkpoints, else ("final",)."""
    return CHECKPOINTS if evaluated_at_several_steps(cells) else CHECKPOINTS[:1]


MARK = "†"  # a cell whose episode counts differ or whose evaluation is incomplete


def usual_episode_count(cells: list[Cell]) -> int | None:
    """The most common episode count of the complete evaluations in the table (None when there are none)."""
    counts = Counter(s.count.done if s.count else len(s.success) for c in cells for s in c.seeds
                     if s.count is None or s.count.complete)
    return counts.most_common(1)[0][0] if counts else None


def _usual_candidates(cells: list[Cell]) -> tuple[int, ...] | None:
    """The most common set of steps the runs' best checkpoints were picked among (None for final checkpoints)."""
    steps = Counter(s.candidates for c in cells for s in c.seeds if s.candidates)
    return steps.most_common(1)[0][0] if steps else None


def _notes(cells: list[Cell]) -> dict[tuple, str | None]:
    """(task, policy, configuration) -> why that cell is marked (Cell.counts_note), or None."""
    usual, usual_steps = usual_episode_count(cells), _usual_candidates(cells)
    return {(c.task, c.policy, c.configuration): c.counts_note(usual, usual_steps) for c in cells}


def _mean_sd(values: list[float], spec: str) -> str:
    m, sd = mean_sd(values)
    return f"{m:{spec}} ({sd:{spec}})" if math.isfinite(sd) else f"{m:{spec}} (-)"  # one seed has no sd


def _interval(low: float, high: float, spec: str) -> str:
    return f"{low:{spec}} to {high:{spec}}" if math.isfinite(low) and math.isfinite(high) else "-"


def _cell_rows(cells: list[Cell], notes: dict, metric: str, shown: tuple[str, ...]) -> list[str]:
    spec = VALUE_FORMAT[metric]
    best_header = f" best checkpoint's {metric} mean (sd) | best at step (by seed) |" if "best" in shown else ""
    lines = [f"| task | policy | optimizer | seeds | episodes/seed | {metric} mean (sd) | pooled 95% CI |{best_header} "
             "val loss mean (sd) |",
             "|---|---|---|---|---|---|---|" + "---|---|" * ("best" in shown) + "---|"]
    for c in sorted(cells, key=lambda c: (c.task, c.policy, c.configuration)):
        key = (c.task, c.policy, c.configuration)
        mark = f" {MARK}" if notes["final"][key] else ""
        lo, hi = c.pooled_interval()
        eps = sorted({len(s.success) for s in c.seeds})
        best = ""
        if "best" in shown:
            best_cell = c.at("best")
            best_mark = f" {MARK}" if notes["best"][key] else ""
            best = (f" {_mean_sd(best_cell.values(), spec)}{best_mark} | "
                    f"{', '.join(str(s.step) for s in best_cell.seeds)} |")
        lines.append(f"| {c.task} | {c.policy} | {c.configuration} | {len(c.seeds)} | "
                     f"{'-'.join(map(str, eps))}{mark} | {_mean_sd(c.values(), spec)}{mark} | "
                     f"{_interval(lo, hi, spec)}{mark} |{best} {_mean_sd(c.val_losses(), '.4g')} |")
    return lines


def _paired_rows(cells: list[Cell], notes: dict, metric: str, shown: tuple[str, ...]) -> list[str]:
    spec = "+" + VALUE_FORMAT[metric]
    rows = []
    for checkpoint in shown:
        marked = {key for key, note in notes[checkpoint].items() if note}
        for task, policy, p in comparisons(cells, checkpoint):
            # pooled rows name several tasks: marked when any of theirs is
            mark = f" {MARK}" if any(key[1:] in ((policy, p.treatment), (policy, p.baseline))
                                     and key[0] in task.split("+") for key in marked) else ""
            discordant = f" {p.only_treatment} / {p.only_baseline} |" if metric == "success" else ""
            rows.append(((task, policy, p.treatment, CHECKPOINTS.index(checkpoint)),
                         f"| {task} | {policy} | {p.treatment} - {p.baseline} | {checkpoint} | {p.n_seeds} | "
                         f"{p.diff:{spec}}{mark} | {_interval(p.ci_low, p.ci_high, spec)} |{discordant} "
                         f"{p.mde:{spec[1:]}} | {p.verdict()}{mark} |"))
    if not rows:
        return []
    # a comparison's final and best rows next to each other (pooled rows keep their place after the tasks')
    order = {key[:3]: i for i, (key, _) in enumerate(rows) if key[3] == 0}
    rows.sort(key=lambda r: (order.get(r[0][:3], len(order)), r[0][3]))
    discordant = " episodes only treatment / only baseline solved |" if metric == "success" else ""
    return ["", f"| task | policy | paired {metric} difference | checkpoints | seeds | mean diff | "
            f"95% CI (t over seeds) |{discordant} detectable difference (80% power) | verdict |",
            "|---|---|---|---|---|---|---|" + "---|" * (metric == "success") + "---|---|",
            *[line for _, line in rows]]


def _metric_table(cells: list[Cell], metric: str) -> str:
    shown = checkpoints_shown(cells)
    notes = {checkpoint: _notes([c.at(checkpoint) for c in cells]) for checkpoint in shown}
    lines = _cell_rows(cells, notes, metric, shown) + _paired_rows(cells, notes, metric, shown)
    marked = [f"{checkpoint + ' checkpoints, ' if len(shown) > 1 else ''}{' '.join(key)}: {note}"
              for checkpoint in shown for key, note in notes[checkpoint].items() if note]
    if "best" in shown:
        lines += ["", f"Best checkpoint: each run's highest {metric} among its own complete evaluations (a tie goes "
                  "to the later step), the same optimistic pick for both arms."]
    if marked:
        usual = usual_episode_count(cells)
        rest = f" than the rest ({usual} episodes per seed)" if usual is not None else ""
        lines += ["", f"{MARK} Not comparable as it stands: these cells have an incomplete evaluation, other episode "
                  f"counts{rest} or a best checkpoint picked among other steps; an interrupted evaluation finishes "
                  "its short episodes first (often successful ones; in a return task, falls), so its numbers are "
                  "biased. Run the evaluation again to complete it.", *[f"- {m}" for m in marked]]
    return "\n".join(lines)


def comparison_table(cells: list[Cell]) -> str:
    """Markdown, per metric (success, then return): one row per cell, then one row per paired comparison of a
    DoPr configuration with its base optimizer (and, for success tasks where the same two were compared on several
    tasks, one row over all of them), each on the runs' final checkpoints and, where runs were evaluated at
    several checkpoints, also on their best ones. A cell with an incomplete evaluation, other episode counts than
    the rest, or a best checkpoint picked among other steps, is marked (MARK) and said in a note under its
    table; so is every comparison it enters."""
    return "\n\n".join(_metric_table([c for c in cells if c.metric == metric], metric)
                        for metric in METRICS if any(c.metric == metric for c in cells))
