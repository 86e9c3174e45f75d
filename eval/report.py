"""The test-time feedback (TTF) report: did lower validation loss mean higher closed-loop success?

A policy trained on one-step targets runs on its own predictions (test-time feedback), so its errors
compound; validation loss measures the first, success the second. For the locomotion tasks, whose primary
metric is return (success there only means surviving to the horizon; dopr.envs.primary_metric), the report
also sets return against validation loss, task by task (returns of different tasks differ in scale).

`build_report(run_dirs, out_dir)` reads training runs (any mix of optimizers, seeds, policies):

    runs/NAME/config.json           optimizer, policy, seed, task (the training configuration)
    runs/NAME/metrics.jsonl         training log (val_loss by step), optional
    runs/NAME/ckpt-*/meta.json      step, val_loss of each checkpoint
    runs/NAME/ckpt-*/eval/results.json            closed-loop success and return (dopr eval)
    runs/NAME/ckpt-*/eval/compounding_error.json  action error vs rollout step (dopr eval --compounding-error)

and writes <out_dir>/report.md with tables and PNG figures, plus report.json (the rows).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass

from dopr.atomic import atomic_path, write_json_atomic, write_text_atomic
from dopr.eval.comparison import MARK  # the table's mark for an incomplete evaluation, here too
from dopr.eval.compounding_error import MIN_RUNNING, shown_part
from dopr.eval.metrics import spearman, wilson_interval
from dopr.eval.results import EpisodeCount
from dopr.eval.runs import is_run_folder, read_run_record


@dataclass
class CheckpointRow:
    run: str
    optimizer: str
    policy: str
    seed: int | None
    task: str | None
    checkpoint: str
    step: int | None
    val_loss: float | None
    success_rate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    mean_return: float | None = None
    return_ci_low: float | None = None  # 95% t interval; None in files written before it was recorded
    return_ci_high: float | None = None
    n_episodes: int | None = None
    # an incomplete evaluation (Ctrl-C, kill) is no result: its rate is kept here, marked, and used nowhere else
    incomplete: str | None = None  # "12 of 50 episodes, success 0.882"
    init: str | None = None
    horizon: int | None = None
    is_final: bool = False


def read_run(run_dir: str) -> tuple[list[CheckpointRow], list[dict], list[dict]]:
    """Checkpoint rows, the metrics.jsonl log and the compounding-error curves of one run folder."""
    record = read_run_record(run_dir)
    run, optimizer = record.name, record.configuration
    by_step: dict = {}
    curves = []
    for ckpt in record.checkpoints:
        row = CheckpointRow(run=run, optimizer=optimizer, policy=record.policy, seed=record.seed, task=ckpt.meta.task,
                            checkpoint=ckpt.path, step=ckpt.meta.step, val_loss=ckpt.meta.val_loss,
                            is_final=ckpt.name == "ckpt-final")
        res = ckpt.results
        count = EpisodeCount.of(res) if res is not None else None
        if count is not None and not count.complete:
            # killed before its first episode ended, an evaluation has no success rate yet (null in results.json)
            so_far = "" if res["success_rate"] is None else f", success {res['success_rate']:.3f}"
            row.incomplete = f"{count.done} of {count.requested} episodes{so_far}"
        elif res is not None:
            row.success_rate, row.ci_low, row.ci_high = res["success_rate"], res["ci_low"], res["ci_high"]
            row.mean_return = res["mean_return"]
            row.return_ci_low, row.return_ci_high = res.get("return_ci_low"), res.get("return_ci_high")
            row.n_episodes = res["n_episodes"]
            row.init = res["protocol"]["init"]
            row.horizon = res["protocol"]["horizon"]
        if ckpt.compounding_error is not None:
            curves.append({**ckpt.compounding_error, "run": run, "optimizer": optimizer, "ckpt_step": row.step})
        # ckpt-final usually repeats the last numbered checkpoint: keep one row per step,
        # preferring the one that was evaluated, then one whose evaluation is incomplete (so it is said)
        old = by_step.get(row.step)
        if old is None or (old.success_rate is None and (row.success_rate is not None
                                                         or (row.incomplete and not old.incomplete))):
            row.is_final = row.is_final or (old is not None and old.is_final)
            by_step[row.step] = row
        elif row.is_final:
            old.is_final = True
    metrics = record.metrics()
    rows = sorted(by_step.values(), key=lambda r: r.step)
    if rows and not any(r.is_final for r in rows):
        rows[-1].is_final = True  # the latest checkpoint stands for the run
    return rows, metrics, curves


def _pooled_interval(rows: list[CheckpointRow]) -> tuple[float, float]:
    """The 95% Wilson interval of the success rate pooled over the rows' episodes."""
    rows = [r for r in rows if r.success_rate is not None and r.n_episodes]
    n = sum(r.n_episodes for r in rows)
    k = sum(round(r.success_rate * r.n_episodes) for r in rows)
    return wilson_interval(k, n) if n else (float("nan"), float("nan"))


# the CheckpointRow field of each metric the report sets against validation loss
METRIC_FIELD = {"success": "success_rate", "return": "mean_return"}


def _spearman_of(rows: list[CheckpointRow], metric: str) -> dict:
    return _spearman_of_values([r.val_loss for r in rows], [getattr(r, METRIC_FIELD[metric]) for r in rows])


def _spearman_of_values(losses: list, values: list) -> dict:
    rho, p, n = spearman(losses, values)
    return {"rho": rho, "p_value": p, "n": n}


def rank_correlations(evaluated: list[CheckpointRow], optimizers: list[str], metric: str = "success") -> dict:
    """Spearman's rho between validation loss and `metric` (success or return), over samples that are independent.

    A run's checkpoints are not: they share one training history, and training step moves both validation
    loss and the metric, so a rho over all checkpoints mostly measures the step and its p-value is not valid.
    The independent units are runs: their final checkpoints (`final`: over all runs and per optimizer), and
    their checkpoints at one training step (`within_step`, every step that 3 or more runs were evaluated at).
    `pooled_checkpoints` keeps the all-checkpoint rho as a description, without a p-value.
    """
    finals = [r for r in evaluated if r.is_final]
    by_step = defaultdict(list)
    for r in evaluated:
        if r.step is not None:
            by_step[r.step].append(r)
    pooled = _spearman_of(evaluated, metric)
    return {
        "final": {"all runs": _spearman_of(finals, metric),
                  **{opt: _spearman_of([r for r in finals if r.optimizer == opt], metric) for opt in optimizers}},
        "within_step": {step: _spearman_of(rs, metric) for step, rs in sorted(by_step.items()) if len(rs) >= 3},
        "pooled_checkpoints": {**pooled, "p_value": None, "n_runs": len({r.run for r in evaluated})},
    }


def return_correlations(evaluated: list[CheckpointRow]) -> dict:
    """{task: rank_correlations of validation loss and return} for each task whose primary metric is return, over
    that task's runs only: returns (and losses) of different tasks differ in scale, so pooled ranks would sort
    tasks, not runs."""
    from dopr.envs import primary_metric

    out = {}
    for task in sorted({r.task for r in evaluated if primary_metric(r.task) == "return"}):
        rows = [r for r in evaluated if r.task == task]
        out[task] = {**rank_correlations(rows, sorted({r.optimizer for r in rows}), "return"),
                     "arms": arm_ranking([r for r in rows if r.is_final])}
    return out


def arm_ranking(finals: list[CheckpointRow]) -> dict:
    """Did validation loss order the arms (configurations) as return did? Each arm's mean final validation loss and
    mean final return over its runs, their ranks (1: lowest loss, highest return; ties share the mean rank), and
    Spearman's rho over the arms' means (n = arms: the question a user choosing an optimizer by validation loss asks,
    where `final` above asks it of single runs)."""
    from scipy.stats import rankdata

    by_arm = defaultdict(list)
    for r in finals:
        if r.mean_return is not None and r.val_loss is not None:
            by_arm[r.optimizer].append(r)
    arms = [{"optimizer": opt, "runs": len(rs), "val_loss": _mean([r.val_loss for r in rs]),
             "mean_return": _mean([r.mean_return for r in rs])} for opt, rs in sorted(by_arm.items())]
    if arms:
        loss_rank = rankdata([a["val_loss"] for a in arms])
        return_rank = rankdata([-a["mean_return"] for a in arms])
        for a, lr, rr in zip(arms, loss_rank, return_rank):
            a["loss_rank"], a["return_rank"] = float(lr), float(rr)
    return {"arms": arms, **_spearman_of_values([a["val_loss"] for a in arms], [a["mean_return"] for a in arms])}


def _verdict(c: dict, metric: str = "success") -> str:
    """What a correlation over independent runs says, only as far as its p-value allows."""
    rho, p, n = c["rho"], c["p_value"], c["n"]
    if math.isnan(rho):
        return f"not enough evaluated runs with distinct values (n={n})"
    stats = f"rho={rho:+.2f}, n={n}, p={p:.2g}"
    if p >= 0.05:
        return f"no relation the runs can establish ({stats})"
    if rho < 0:
        return f"lower validation loss went with higher {metric} ({stats})"
    return f"lower validation loss went with LOWER {metric} ({stats})"


def _fmt(x, spec=".4g"):
    return "-" if x is None else format(x, spec)


def build_report(run_dirs: list[str], out_dir: str = "out/report", cells=None) -> str:
    """Write report.md, report.json and the PNG figures into out_dir; return report.md's path.

    `cells`: the runs' final checkpoints as dopr.eval.comparison cells, when the caller has read them
    already (`dopr experiment` prints the same table); else they are read here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [d for d in run_dirs if os.path.isdir(d)]
    if not run_dirs:
        raise ValueError("dopr report: no run folders given (expected runs/NAME with ckpt-*/ inside)")
    rows, metrics, curves = [], {}, []
    for d in run_dirs:
        if not is_run_folder(d):
            print(f"dopr report: {d}: no config.json (not a dopr train run folder), skipped")
            continue
        r, m, c = read_run(d)
        if not r:
            print(f"dopr report: {d}: no checkpoints with meta.json, skipped")
            continue
        rows += r
        metrics[r[0].run] = m
        curves += c
    if not rows:
        raise ValueError(f"dopr report: none of {len(run_dirs)} folders holds a checkpoint with meta.json")
    os.makedirs(out_dir, exist_ok=True)
    optimizers = sorted({r.optimizer for r in rows})
    colors = {opt: plt.get_cmap("tab10")(i % 10) for i, opt in enumerate(optimizers)}
    evaluated = [r for r in rows if r.success_rate is not None and r.val_loss is not None]

    correlations = rank_correlations(evaluated, optimizers)
    by_return = return_correlations(evaluated)

    figures = []
    # 1. success (and, for return tasks, return) against validation loss, one point per evaluated checkpoint
    if evaluated:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        _metric_vs_loss(ax, evaluated, optimizers, colors, "success")
        ax.set_title("Success vs validation loss (one point per checkpoint;\na thin line joins a run's checkpoints)",
                     fontsize=10)
        figures.append(_save(fig, out_dir, "success_vs_val_loss.png"))
    if by_return:
        fig, axes = plt.subplots(1, len(by_return), figsize=(6 * len(by_return), 4.5), squeeze=False)
        for ax, task in zip(axes[0], by_return):
            _metric_vs_loss(ax, [r for r in evaluated if r.task == task], optimizers, colors, "return")
            ax.set_title(f"{task}: return vs validation loss (one point per checkpoint;\na thin line joins a run's "
                         "checkpoints)", fontsize=10)
        figures.append(_save(fig, out_dir, "return_vs_val_loss.png"))
    # 2. validation loss and success against training step, one line per run
    fig, (ax_loss, ax_succ) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in sorted({r.run for r in rows}):
        sel = [r for r in rows if r.run == run and r.step is not None]
        if not sel:
            continue
        color = colors[sel[0].optimizer]
        logged = [m for m in metrics.get(run, []) if m.get("val_loss") is not None and m.get("step") is not None]
        if logged:
            ax_loss.plot([m["step"] for m in logged], [m["val_loss"] for m in logged], "-", color=color, alpha=0.7)
        pts = [r for r in sel if r.val_loss is not None]
        ax_loss.plot([r.step for r in pts], [r.val_loss for r in pts], "o" if logged else "o-", color=color,
                     alpha=0.8)
        ev = [r for r in sel if r.success_rate is not None]
        if ev:
            ax_succ.plot([r.step for r in ev], [r.success_rate for r in ev], "o-", color=color, alpha=0.8)
    for opt in optimizers:
        ax_succ.plot([], [], "o-", color=colors[opt], label=opt)
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("validation loss")
    ax_loss.set_title("Validation loss")
    ax_succ.set_xlabel("training step")
    ax_succ.set_ylabel("success rate")
    ax_succ.set_ylim(-0.05, 1.05)
    ax_succ.set_title("Closed-loop success")
    ax_succ.legend(fontsize=8)
    for ax in (ax_loss, ax_succ):
        ax.grid(alpha=0.3)
    figures.append(_save(fig, out_dir, "training_curves.png"))
    # 3. the compounding-error curve
    if curves:
        figures.append(_compounding_figure(plt, curves, colors, out_dir))

    # 4. DoPr against its base optimizer: each training seed's paired difference, and the mean's 95% interval
    from dopr.eval.comparison import cells_from_runs, checkpoints_shown, comparison_table, comparisons

    cells = cells_from_runs(run_dirs) if cells is None else cells
    for metric, name in PAIRED_FIGURES.items():
        of_metric = [c for c in cells if c.metric == metric]
        compared = [(task, policy, checkpoint, p) for checkpoint in checkpoints_shown(of_metric)
                    for task, policy, p in comparisons(of_metric, checkpoint)]
        if compared:
            figures.append(_paired_figure(plt, compared, metric, out_dir, name))
    plt.close("all")

    md = _markdown(rows, evaluated, correlations, by_return, optimizers, curves, figures)
    if cells:
        md += ("\n## Final (and best) checkpoints per cell, and DoPr against its base optimizer (paired by training "
               "seed and episode seed)\n\n" + comparison_table(cells) + "\n")
    path = os.path.join(out_dir, "report.md")
    write_text_atomic(path, md)
    write_json_atomic(os.path.join(out_dir, "report.json"),
                      {"checkpoints": [asdict(r) for r in rows], "spearman_val_loss_vs_success": correlations,
                       "spearman_val_loss_vs_return": by_return, "compounding_error": curves})
    return path


PAIRED_FIGURES = {"success": "paired_differences.png", "return": "paired_return_differences.png"}
# the CheckpointRow fields of each metric's 95% interval
INTERVAL_FIELDS = {"success": ("ci_low", "ci_high"), "return": ("return_ci_low", "return_ci_high")}
METRIC_AXIS = {"success": "closed-loop success rate (95% Wilson CI)", "return": "mean return (95% t CI)"}


def _metric_vs_loss(ax, rows: list[CheckpointRow], optimizers: list[str], colors: dict, metric: str) -> None:
    """`metric` against validation loss on `ax`: one point per evaluated checkpoint with its 95% interval, a thin
    line joining a run's checkpoints (one sample path, not independent points)."""
    field, (low, high) = METRIC_FIELD[metric], INTERVAL_FIELDS[metric]

    def below_above(r):  # an interval older files do not have (or of one episode) is drawn as none
        y, lo, hi = getattr(r, field), getattr(r, low), getattr(r, high)
        return (0.0, 0.0) if lo is None or hi is None or math.isnan(lo) else (y - lo, hi - y)

    for opt in optimizers:
        sel = [r for r in rows if r.optimizer == opt]
        if not sel:
            continue
        err = list(zip(*(below_above(r) for r in sel)))
        ax.errorbar([r.val_loss for r in sel], [getattr(r, field) for r in sel], yerr=err, fmt="o", color=colors[opt],
                    alpha=0.8, capsize=2, label=opt)
        for run in sorted({r.run for r in sel}):
            path = sorted((r for r in sel if r.run == run and r.step is not None), key=lambda r: r.step)
            ax.plot([r.val_loss for r in path], [getattr(r, field) for r in path], "-", color=colors[opt],
                    alpha=0.3, lw=0.8)
    ax.set_xlabel("validation loss")
    ax.set_ylabel(METRIC_AXIS[metric])
    if metric == "success":
        ax.set_ylim(-0.05, 1.05)
    if all(r.val_loss > 0 for r in rows) and max(r.val_loss for r in rows) > 10 * min(r.val_loss for r in rows):
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _paired_figure(plt, compared: list[tuple], metric: str, out_dir: str, name: str) -> str:
    """Each (task, policy, checkpoint, PairedComparison): the training seeds' paired differences (dots) and the
    mean with its 95% t interval (bar; red when it excludes 0)."""
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.8 * len(compared)))
    for i, (_, _, _, p) in enumerate(compared):
        y = len(compared) - 1 - i
        ax.scatter(p.diffs, [y + 0.18] * len(p.diffs), s=12, color="0.55", alpha=0.7, zorder=2)
        ax.errorbar([p.diff], [y], xerr=[[p.diff - p.ci_low], [p.ci_high - p.diff]] if p.n_seeds > 1 else None,
                    fmt="o", color="C3" if p.ci_low > 0 or p.ci_high < 0 else "k", capsize=3, zorder=3)
    ax.set_yticks(range(len(compared)))
    ax.set_yticklabels([f"{task} {policy}, {p.n_seeds} seeds, {checkpoint}\n{p.treatment}\nminus {p.baseline}"
                        for task, policy, checkpoint, p in reversed(compared)], fontsize=7)
    ax.axvline(0, color="0.3", lw=0.8)
    what = "success-rate" if metric == "success" else "mean-return"
    ax.set_xlabel(f"paired {what} difference (dots: seeds; bar: mean, 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out_dir, name)


def _compounding_figure(plt, curves: list[dict], colors: dict, out_dir: str) -> str:
    """Median and interquartile band of each curve while enough episodes run (top), and how many run (bottom)."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    shown = [shown_part(c) for c in curves]
    for c, part in zip(curves, shown):
        color = colors.get(c["optimizer"], "k")
        ax.plot(part["step"], part["center"], color=color, alpha=0.9, lw=1.2)
        ax.fill_between(part["step"], part["low"], part["high"], color=color, alpha=0.12, lw=0)
        ax_n.step(c["step"], c["count"], where="post", color=color, alpha=0.6, lw=1)
        ax_n.step(part["step"], part["count"], where="post", color=color, alpha=0.9, lw=2)
    for opt in sorted({c["optimizer"] for c in curves}):
        ax.plot([], [], color=colors.get(opt, "k"), label=opt)
    old_files = any(p["center_name"] == "mean" for p in shown)
    ax.set_ylabel("|policy action - expert action|\nover the episodes still running")
    minimum = sorted({p["min_running"] for p in shown})
    ax.set_title("Compounding error: median and interquartile band"
                 + (" (mean +- sd: older files)" if old_files else "")
                 + f",\nshown while at least {'/'.join(map(str, minimum))} episodes still run", fontsize=10)
    ax.legend(fontsize=8)
    ax_n.set_ylabel("episodes\nstill running")
    ax_n.set_xlabel("rollout step (control steps from a demonstration's initial state)")
    ax_n.set_ylim(bottom=0)
    # the few episodes that run on to the horizon would squeeze the shown part into a corner: say how many instead
    longest = max(len(c["step"]) for c in curves)
    right = min(longest, 2 * max((p["step"][-1] for p in shown if p["step"]), default=0) + 10)
    if right < longest:
        ax_n.set_xlim(-0.02 * right, right)
        tail = max(c["count"][right] for c in curves if len(c["count"]) > right)
        ax_n.text(0.99, 0.6, f"beyond step {right}: at most {tail} episodes of a curve run on (to step {longest - 1})",
                  transform=ax_n.transAxes, ha="right", va="top", fontsize=7)
    for a in (ax, ax_n):
        a.grid(alpha=0.3)
    return _save(fig, out_dir, "compounding_error.png")


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    with atomic_path(os.path.join(out_dir, name)) as tmp:  # the temporary name keeps ".png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")  # long tick labels (an optimizer's full spec) stay whole
    return name


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt_rho(rho: float) -> str:
    return "rho -" if math.isnan(rho) else f"rho={rho:+.2f}"


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _final_checkpoints_line(ranked: list[tuple], by_opt: dict) -> str | None:
    """Which configuration had the lowest validation loss and which the highest success at the end, saying so
    when the best are tied, and when the pooled 95% intervals do not separate them."""
    with_both = [t for t in ranked if t[1] is not None and t[2] is not None]
    if len(with_both) < 2:
        return None
    low, top = min(t[1] for t in with_both), max(t[2] for t in with_both)
    best_loss = [t[0] for t in with_both if math.isclose(t[1], low, rel_tol=1e-9)]
    best = [t[0] for t in with_both if math.isclose(t[2], top, abs_tol=1e-9)]
    success = {t[0]: t[2] for t in with_both}
    interval = {t[0]: _pooled_interval(by_opt[t[0]]) for t in with_both}

    def overlaps(a, b):
        return interval[a][0] <= interval[b][1] and interval[b][0] <= interval[a][1]

    def spans(names):
        return ", ".join(f"{o} {interval[o][0]:.2f}-{interval[o][1]:.2f}" for o in names)

    # the configurations the episodes cannot tell from a best one: their pooled 95% intervals overlap
    close = [t[0] for t in with_both if t[0] not in best and any(overlaps(t[0], b) for b in best)]
    tie = len(best) > 1
    line = (f"- Final checkpoints: lowest mean validation loss {_names(best_loss)} ({low:.4g}"
            f"{', a tie' if len(best_loss) > 1 else ''}), highest mean success {_names(best)} ({top:.3f}"
            f"{', an exact tie' if tie else ''})")
    if set(best_loss) & set(best):
        line += (": validation loss picked " + ("one of the configurations tied for the highest success"
                                                if tie or len(best_loss) > 1 else "the configuration success picked"))
    elif any(o in close for o in best_loss):
        line += (": validation loss did NOT pick the configuration with the highest success, but their pooled 95% "
                 f"intervals overlap ({spans(best + [o for o in best_loss if o in close])}): the episodes do not "
                 "resolve that difference")
    else:
        line += (f": validation loss did NOT pick the configuration with the highest success; their pooled 95% "
                 f"intervals separate ({spans(best_loss + best)}): choosing by validation loss would have cost "
                 f"{top - max(success[o] for o in best_loss):.2f} in success")
    others = [o for o in close if o not in best_loss]
    if others:
        line += (f"; the pooled 95% intervals of {_names(others)} overlap {'those of the best' if tie else 'the best'}"
                 f" ({spans(best + others)}), so the episodes do not single out "
                 f"{'a highest' if tie else _names(best)} either")
    return line + "."


def _glance_lines(correlations: dict, metric: str) -> list[str]:
    """The correlations of validation loss and `metric` in words, as far as their p-values allow."""
    lines = [f"- Across runs (final checkpoints, one per run): {_verdict(correlations['final']['all runs'], metric)}."]
    for opt, c in correlations["final"].items():
        if opt != "all runs":
            lines.append(f"- {opt}, across its runs' final checkpoints: {_verdict(c, metric)}.")
    within = correlations["within_step"]
    if within:
        lines.append("- Across runs at the same training step: " + "; ".join(
            f"step {step}: {_verdict(c, metric)}" for step, c in within.items()) + ".")
    pooled = correlations["pooled_checkpoints"]
    lines.append(f"- Pooled over all {pooled['n']} evaluated checkpoints of {pooled['n_runs']} runs: "
                 f"{_fmt_rho(pooled['rho'])}, a description only (a run's checkpoints share its training history, "
                 f"and training step moves both validation loss and {metric}).")
    return lines


def _correlation_table(correlations: dict, metric: str, title: str) -> list[str]:
    """The section of Spearman's rho between validation loss and `metric`: over final checkpoints, each step,
    and (descriptive) all checkpoints."""
    pooled, within = correlations["pooled_checkpoints"], correlations["within_step"]
    lines = [f"## Spearman rank correlation, validation loss vs {title}", "",
             f"Negative: lower loss, higher {metric}. p-values are given only over independent runs: a run's "
             "checkpoints share one training history, and training step moves both validation loss and "
             f"{metric}, so the rho over all checkpoints describes them but is no test.", "",
             "| group | checkpoints correlated | rho | p-value | n |", "|---|---|---|---|---|"]
    table = [(group, "final checkpoint of each run", c) for group, c in correlations["final"].items()]
    table += [("all runs", f"step {step}, one checkpoint per run", c) for step, c in within.items()]
    table.append(("all checkpoints (descriptive)", f"every evaluated checkpoint of {pooled['n_runs']} runs, "
                  "steps mixed", pooled))
    for group, what, c in table:
        rho = "-" if math.isnan(c["rho"]) else f"{c['rho']:+.3f}"
        p = "-" if c["p_value"] is None or math.isnan(c["p_value"]) else f"{c['p_value']:.3g}"
        lines.append(f"| {group} | {what} | {rho} | {p} | {c['n']} |")
    return lines + [""]


def _arm_ranking_table(ranking: dict, task: str) -> list[str]:
    """The arms of a return task ranked by mean final validation loss and by mean final return, with the rho over
    the arms' means in words."""
    arms = ranking["arms"]
    if len(arms) < 2:
        return []
    by_loss = min(arms, key=lambda a: a["loss_rank"])
    by_return = min(arms, key=lambda a: a["return_rank"])
    lines = [f"## Arms ranked by validation loss and by return ({task}, final checkpoints)", "",
             f"Each arm's means over its runs; rank 1 is the lowest validation loss and the highest return. Over the "
             f"{len(arms)} arms' means: {_verdict(ranking, 'return')}. The lowest validation loss, "
             f"{by_loss['optimizer']}, ranks {by_loss['return_rank']:g} of {len(arms)} in return; the highest return, "
             f"{by_return['optimizer']}, ranks {by_return['loss_rank']:g} in validation loss.", "",
             "| optimizer | runs | mean val loss | val-loss rank | mean return | return rank |",
             "|---|---|---|---|---|---|"]
    for a in sorted(arms, key=lambda a: a["return_rank"]):
        lines.append(f"| {a['optimizer']} | {a['runs']} | {_fmt(a['val_loss'])} | {a['loss_rank']:g} | "
                     f"{a['mean_return']:.1f} | {a['return_rank']:g} |")
    return lines + [""]


def _return_cell(r: CheckpointRow) -> str:
    if r.mean_return is None:
        return "-"
    interval = ("" if r.return_ci_low is None or math.isnan(r.return_ci_low)
                else f" ({r.return_ci_low:.4g} to {r.return_ci_high:.4g})")
    return f"{r.mean_return:.4g}{interval}"


def _markdown(rows, evaluated, correlations, by_return, optimizers, curves, figures) -> str:
    lines = [f"# Closed-loop success{' and return' if by_return else ''} vs validation loss", ""]
    runs = sorted({r.run for r in rows})
    tasks = sorted({str(r.task) for r in rows})
    lines += [f"{len(runs)} runs, {len(rows)} checkpoints ({len(evaluated)} evaluated closed-loop); "
              f"optimizers: {', '.join(optimizers)}; tasks: {', '.join(tasks)}.", ""]
    lines += ["## At a glance", ""]
    lines += _glance_lines(correlations, "success")
    incomplete = [r for r in rows if r.incomplete]
    if incomplete:
        lines.append(f"- {len(incomplete)} evaluation(s) are incomplete ({MARK} in the checkpoint table): left out of "
                     "every number, figure and correlation here, since an interrupted evaluation finishes its short "
                     "(often successful) episodes first; run the evaluation again to complete them.")
    counts = sorted({r.n_episodes for r in evaluated})
    if len(counts) > 1:
        lines.append(f"- The evaluated checkpoints differ in episode count ({', '.join(map(str, counts))}): "
                     "their success rates differ in precision, and the pooled intervals weight them by episodes.")
    finals = [r for r in rows if r.is_final]
    by_opt = defaultdict(list)
    for r in finals:
        by_opt[r.optimizer].append(r)
    ranked = [(opt, _mean([r.val_loss for r in rs]), _mean([r.success_rate for r in rs]), len(rs))
              for opt, rs in sorted(by_opt.items())]
    line = _final_checkpoints_line(ranked, by_opt)
    if line:
        lines.append(line)
    for task, c in by_return.items():
        lines += ["", f"Return against validation loss, {task} (its primary metric; success there means surviving to "
                  "the horizon):", "", *_glance_lines(c, "return")]
    lines.append("")
    lines += ["## Final checkpoint per run, by optimizer", "",
              "| optimizer | runs | mean val loss | mean success |", "|---|---|---|---|"]
    for opt, loss, succ, n in ranked:
        lines.append(f"| {opt} | {n} | {_fmt(loss)} | {_fmt(succ, '.3f')} |")
    lines.append("")
    lines += _correlation_table(correlations, "success", "success")
    for task, c in by_return.items():
        lines += _correlation_table(c, "return", f"return ({task})")
        lines += _arm_ranking_table(c["arms"], task)
    lines += ["## Figures", ""]
    captions = {
        "success_vs_val_loss.png": "Success vs validation loss, one point per evaluated checkpoint, coloured by "
                                   "optimizer; a thin line joins the checkpoints of one run.",
        "return_vs_val_loss.png": "Mean return (95% t interval over episodes) vs validation loss, one panel per "
                                  "task whose primary metric is return, one point per evaluated checkpoint; a thin "
                                  "line joins the checkpoints of one run.",
        "training_curves.png": "Validation loss (left) and closed-loop success (right) against training step, "
                               "one line per run.",
        "compounding_error.png": "Action error against rollout step from demonstration start states (expert labels): "
                                 "the median over the episodes still running and its interquartile band (top), and "
                                 "how many still run (bottom; bold while the curve is shown). Successful episodes end, "
                                 "so late steps rest on fewer, mostly failing, episodes; a curve stops where fewer "
                                 f"than a quarter of its episodes, or fewer than {MIN_RUNNING}, still run.",
        "paired_differences.png": "DoPr minus its base optimizer in success rate, paired by training seed and episode "
                                  "seed, on final checkpoints (and best ones, where runs were evaluated at several): "
                                  "grey dots are seeds, the bar the mean with its 95% t-interval (red: excludes 0).",
        "paired_return_differences.png": "The same for the tasks whose primary metric is return: DoPr minus its base "
                                         "optimizer in mean return.",
    }
    for name in figures:
        lines += [f"![{name}]({name})", "", captions[name], ""]
    lines += ["## All checkpoints", "",
              "| run | optimizer | policy | seed | step | val loss | success | 95% CI | mean return (95% t CI) "
              "| episodes | init | horizon |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r.ci_low is None else f"{r.ci_low:.2f}-{r.ci_high:.2f}"
        success, episodes = _fmt(r.success_rate, '.3f'), _fmt(r.n_episodes, '')
        if r.incomplete:
            success, episodes = f"{MARK} incomplete, not used", f"{MARK} {r.incomplete}"
        lines.append(f"| {r.run} | {r.optimizer} | {r.policy} | {_fmt(r.seed, '')} | {_fmt(r.step, '')} | "
                     f"{_fmt(r.val_loss)} | {success} | {ci} | {_return_cell(r)} | {episodes} | "
                     f"{r.init or '-'} | {_fmt(r.horizon, '')} |")
    if curves:
        lines += ["", "## Compounding error", "",
                  "Median action error over the episodes still running (the mean and sd for files written before the "
                  f"median was recorded), shown up to the last step at which at least a quarter of the episodes and at "
                  f"least {MIN_RUNNING} (all, when fewer were run) still run.", "",
                  "| run | checkpoint step | episodes | statistic | at step 0 | at the last step all episodes run | "
                  "shown up to step (episodes running there) | there (band) | largest shown |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in curves:
            part = shown_part(c)
            if not part["step"]:
                lines.append(f"| {c['run']} | {_fmt(c['ckpt_step'], '')} | {c.get('episodes')}" + " | -" * 6 + " |")
                continue
            all_running = [v for v, n in zip(part["center"], part["count"]) if n == part["count"][0]]
            last = len(part["step"]) - 1
            lines.append(f"| {c['run']} | {_fmt(c['ckpt_step'], '')} | {c.get('episodes')} | {part['center_name']} | "
                         f"{_fmt(part['center'][0])} | {_fmt(all_running[-1])} | "
                         f"{part['step'][last]} ({part['count'][last]}) | {_fmt(part['center'][last])} "
                         f"({_fmt(part['low'][last])}-{_fmt(part['high'][last])}) | {_fmt(max(part['center']))} |")
    lines.append("")
    return "\n".join(lines)
