"""The test-time feedback (TTF) report: did lower validation loss mean higher closed-loop success?

A policy trained on one-step targets runs on its own predictions (test-time feedback), so its errors
compound; validation loss measures the first, success the second.

`build_report(run_dirs, out_dir)` reads training runs (any mix of optimizers, seeds, policies):

    runs/NAME/config.json           optimizer, policy, seed, task (the training configuration)
    runs/NAME/metrics.jsonl         training log (val_loss by step), optional
    runs/NAME/ckpt-*/meta.json      step, val_loss of each checkpoint
    runs/NAME/ckpt-*/eval/results.json            closed-loop success (dopr eval)
    runs/NAME/ckpt-*/eval/compounding_error.json  action error vs rollout step (dopr eval --compounding-error)

and writes <out_dir>/report.md with tables and PNG figures, plus report.json (the rows).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass

from dopr.data.atomic import atomic_path, read_jsonl, write_json_atomic, write_text_atomic
from dopr.eval.metrics import spearman, wilson_interval
from dopr.eval.results import COMPOUNDING_FILE, RESULTS_FILE


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
    n_episodes: int | None = None
    init: str | None = None
    horizon: int | None = None
    is_final: bool = False


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt JSON ({err})") from None


def _find(d, *names):
    """The first of `names` found in d or in its nested dicts (configs nest differently)."""
    if not isinstance(d, dict):
        return None
    for name in names:
        if d.get(name) is not None and not isinstance(d[name], dict):
            return d[name]
    for v in d.values():
        if isinstance(v, dict):
            found = _find(v, *names)
            if found is not None:
                return found
    return None


def configuration_name(cfg: dict) -> str:
    """The compared configuration of a run's config.json: its label (e.g. "dopr-adamw:damping=0.3"), else its
    optimizer."""
    opt = _find(cfg, "label") or _find(cfg, "optimizer", "optim", "optimizer_name")
    return str(opt) if opt is not None else "unknown"


def _float_or_none(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def read_run(run_dir: str) -> tuple[list[CheckpointRow], list[dict], list[dict]]:
    """Checkpoint rows, the metrics.jsonl log and the compounding-error curves of one run folder."""
    cfg_path = os.path.join(run_dir, "config.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    run = os.path.basename(os.path.normpath(run_dir))
    optimizer = configuration_name(cfg)
    policy = str(_find(cfg, "policy_kind", "kind") or _find(cfg, "policy") or "unknown")
    seed = _find(cfg, "seed")
    task = _find(cfg, "task")
    by_step: dict = {}
    curves = []
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and os.path.isdir(os.path.join(run_dir, d)))
    for name in ckpts:
        path = os.path.join(run_dir, name)
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            continue  # a temporary or incomplete checkpoint
        meta = _read_json(meta_path)
        row = CheckpointRow(run=run, optimizer=optimizer, policy=policy, seed=seed,
                            task=_find(meta, "task") or task, checkpoint=path, step=meta.get("step"),
                            val_loss=_float_or_none(meta.get("val_loss")), is_final=name == "ckpt-final")
        res_path = os.path.join(path, "eval", RESULTS_FILE)
        if os.path.isfile(res_path):
            res = _read_json(res_path)
            row.success_rate, row.ci_low, row.ci_high = res["success_rate"], res["ci_low"], res["ci_high"]
            row.n_episodes = res["n_episodes"]
            row.init = res.get("protocol", {}).get("init")
            row.horizon = res.get("protocol", {}).get("horizon")
        ce_path = os.path.join(path, "eval", COMPOUNDING_FILE)
        if os.path.isfile(ce_path):
            curves.append({**_read_json(ce_path), "run": run, "optimizer": optimizer, "ckpt_step": row.step})
        # ckpt-final usually repeats the last numbered checkpoint: keep one row per step,
        # preferring the one that was evaluated
        key = row.step if row.step is not None else name
        old = by_step.get(key)
        if old is None or (old.success_rate is None and row.success_rate is not None):
            row.is_final = row.is_final or (old is not None and old.is_final)
            by_step[key] = row
        elif row.is_final:
            old.is_final = True
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    metrics = read_jsonl(metrics_path) if os.path.isfile(metrics_path) else []
    rows = sorted(by_step.values(), key=lambda r: (r.step is None, r.step or 0))
    if rows and not any(r.is_final for r in rows):
        rows[-1].is_final = True  # the latest checkpoint stands for the run
    return rows, metrics, curves


def _pooled_interval(rows: list[CheckpointRow]) -> tuple[float, float]:
    """The 95% Wilson interval of the success rate pooled over the rows' episodes."""
    rows = [r for r in rows if r.success_rate is not None and r.n_episodes]
    n = sum(r.n_episodes for r in rows)
    k = sum(round(r.success_rate * r.n_episodes) for r in rows)
    return wilson_interval(k, n) if n else (float("nan"), float("nan"))


def _verdict(rho: float, n: int) -> str:
    if math.isnan(rho):
        return f"not enough evaluated checkpoints with distinct values (n={n})"
    if rho <= -0.5:
        return f"lower validation loss went with higher success (rho={rho:+.2f}, n={n})"
    if rho >= 0.5:
        return f"lower validation loss went with LOWER success (rho={rho:+.2f}, n={n})"
    return f"validation loss did not predict success (rho={rho:+.2f}, n={n})"


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

    correlations = {}
    for opt in optimizers + ["pooled"]:
        sel = [r for r in evaluated if opt == "pooled" or r.optimizer == opt]
        rho, p, n = spearman([r.val_loss for r in sel], [r.success_rate for r in sel])
        correlations[opt] = {"rho": rho, "p_value": p, "n": n}

    figures = []
    # 1. success against validation loss, one point per evaluated checkpoint
    if evaluated:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for opt in optimizers:
            sel = [r for r in evaluated if r.optimizer == opt]
            if not sel:
                continue
            x = [r.val_loss for r in sel]
            y = [r.success_rate for r in sel]
            err = [[r.success_rate - r.ci_low for r in sel], [r.ci_high - r.success_rate for r in sel]]
            rho = correlations[opt]["rho"]
            ax.errorbar(x, y, yerr=err, fmt="o", color=colors[opt], alpha=0.8, capsize=2,
                        label=f"{opt} (Spearman {rho:+.2f})" if not math.isnan(rho) else opt)
        ax.set_xlabel("validation loss")
        ax.set_ylabel("closed-loop success rate (95% Wilson CI)")
        ax.set_ylim(-0.05, 1.05)
        if all(r.val_loss > 0 for r in evaluated) and max(r.val_loss for r in evaluated) > 10 * min(
                r.val_loss for r in evaluated):
            ax.set_xscale("log")
        ax.set_title("Success vs validation loss (one point per checkpoint)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figures.append(_save(fig, out_dir, "success_vs_val_loss.png"))
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
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for c in curves:
            ax.plot(c["step"], c["mean"], color=colors.get(c["optimizer"], "k"), alpha=0.8)
        for opt in sorted({c["optimizer"] for c in curves}):
            ax.plot([], [], color=colors.get(opt, "k"), label=opt)
        ax.set_xlabel("rollout step (control steps from a demonstration's initial state)")
        ax.set_ylabel("|policy action - expert action| (mean over episodes)")
        ax.set_title("Compounding error")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figures.append(_save(fig, out_dir, "compounding_error.png"))

    # 4. DoPr against its base optimizer: each training seed's paired difference, and the mean's 95% interval
    from dopr.eval.comparison import cells_from_runs, comparison_table, comparisons

    cells = cells_from_runs(run_dirs) if cells is None else cells
    compared = comparisons(cells)
    if compared:
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(compared)))
        for i, (task, policy, p) in enumerate(compared):
            y = len(compared) - 1 - i
            ax.scatter(p.diffs, [y + 0.18] * len(p.diffs), s=12, color="0.55", alpha=0.7, zorder=2)
            ax.errorbar([p.diff], [y], xerr=[[p.diff - p.ci_low], [p.ci_high - p.diff]] if p.n_seeds > 1 else None,
                        fmt="o", color="C3" if p.ci_low > 0 or p.ci_high < 0 else "k", capsize=3, zorder=3)
        ax.set_yticks(range(len(compared)))
        ax.set_yticklabels([f"{task} {policy}, {p.n_seeds} seeds\n{p.treatment} - {p.baseline}"
                            for task, policy, p in reversed(compared)], fontsize=7)
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_xlabel("paired success-rate difference (dots: seeds; bar: mean, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
        figures.append(_save(fig, out_dir, "paired_differences.png"))
    plt.close("all")

    md = _markdown(rows, evaluated, correlations, optimizers, curves, figures)
    if cells:
        md += ("\n## Final checkpoints per cell, and DoPr against its base optimizer (paired by training seed and "
               "episode seed)\n\n" + comparison_table(cells) + "\n")
    path = os.path.join(out_dir, "report.md")
    write_text_atomic(path, md)
    write_json_atomic(os.path.join(out_dir, "report.json"),
                      {"checkpoints": [asdict(r) for r in rows], "spearman_val_loss_vs_success": correlations,
                       "compounding_error": curves})
    return path


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    with atomic_path(os.path.join(out_dir, name)) as tmp:  # the temporary name keeps ".png"
        fig.savefig(tmp, dpi=110)
    return name


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _markdown(rows, evaluated, correlations, optimizers, curves, figures) -> str:
    lines = ["# Closed-loop success vs validation loss", ""]
    runs = sorted({r.run for r in rows})
    tasks = sorted({str(r.task) for r in rows})
    lines += [f"{len(runs)} runs, {len(rows)} checkpoints ({len(evaluated)} evaluated closed-loop); "
              f"optimizers: {', '.join(optimizers)}; tasks: {', '.join(tasks)}.", ""]
    lines += ["## At a glance", ""]
    lines.append(f"- Pooled over all evaluated checkpoints: {_verdict(correlations['pooled']['rho'], correlations['pooled']['n'])}.")
    for opt in optimizers:
        c = correlations[opt]
        lines.append(f"- {opt}: {_verdict(c['rho'], c['n'])}.")
    finals = [r for r in rows if r.is_final]
    by_opt = defaultdict(list)
    for r in finals:
        by_opt[r.optimizer].append(r)
    ranked = [(opt, _mean([r.val_loss for r in rs]), _mean([r.success_rate for r in rs]), len(rs))
              for opt, rs in sorted(by_opt.items())]
    with_both = [t for t in ranked if t[1] is not None and t[2] is not None]
    if len(with_both) >= 2:
        best_loss = min(with_both, key=lambda t: t[1])
        best_success = max(with_both, key=lambda t: t[2])
        same = best_loss[0] == best_success[0]
        line = (f"- Final checkpoints: lowest mean validation loss {best_loss[0]} ({best_loss[1]:.4g}), highest "
                f"mean success {best_success[0]} ({best_success[2]:.3f}): validation loss "
                f"{'ranked the optimizers as success did' if same else 'did NOT rank the optimizers as success did'}")
        if not same:
            # The disagreement matters only where the two arms' pooled 95% intervals separate.
            (lo_s, hi_s), (lo_l, hi_l) = _pooled_interval(by_opt[best_success[0]]), _pooled_interval(by_opt[best_loss[0]])
            both = f"{best_loss[0]} {lo_l:.2f}-{hi_l:.2f}, {best_success[0]} {lo_s:.2f}-{hi_s:.2f}"
            if hi_l >= lo_s:
                line += f", but their pooled 95% intervals overlap ({both}): the episodes do not resolve that difference"
            else:
                line += (f"; their pooled 95% intervals separate ({both}): choosing by validation loss would have "
                         f"cost {best_success[2] - best_loss[2]:.2f} in success")
        lines.append(line + ".")
    lines.append("")
    lines += ["## Final checkpoint per run, by optimizer", "",
              "| optimizer | runs | mean val loss | mean success |", "|---|---|---|---|"]
    for opt, loss, succ, n in ranked:
        lines.append(f"| {opt} | {n} | {_fmt(loss)} | {_fmt(succ, '.3f')} |")
    lines.append("")
    lines += ["## Spearman rank correlation, validation loss vs success", "",
              "Negative: lower loss, higher success.", "",
              "| group | rho | p-value | checkpoints |", "|---|---|---|---|"]
    for group, c in correlations.items():
        rho = "-" if math.isnan(c["rho"]) else f"{c['rho']:+.3f}"
        p = "-" if math.isnan(c["p_value"]) else f"{c['p_value']:.3g}"
        lines.append(f"| {group} | {rho} | {p} | {c['n']} |")
    lines.append("")
    lines += ["## Figures", ""]
    captions = {
        "success_vs_val_loss.png": "Success vs validation loss, one point per evaluated checkpoint, coloured by optimizer.",
        "training_curves.png": "Validation loss (left) and closed-loop success (right) against training step, one line per run.",
        "compounding_error.png": "Action error against rollout step from demonstration start states (expert labels).",
        "paired_differences.png": "DoPr minus its base optimizer in success rate, paired by training seed and episode "
                                  "seed: grey dots are seeds, the bar the mean with its 95% t-interval (red: excludes 0).",
    }
    for name in figures:
        lines += [f"![{name}]({name})", "", captions[name], ""]
    lines += ["## All checkpoints", "",
              "| run | optimizer | policy | seed | step | val loss | success | 95% CI | episodes | init | horizon |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r.ci_low is None else f"{r.ci_low:.2f}-{r.ci_high:.2f}"
        lines.append(f"| {r.run} | {r.optimizer} | {r.policy} | {_fmt(r.seed, '')} | {_fmt(r.step, '')} | "
                     f"{_fmt(r.val_loss)} | {_fmt(r.success_rate, '.3f')} | {ci} | {_fmt(r.n_episodes, '')} | "
                     f"{r.init or '-'} | {_fmt(r.horizon, '')} |")
    if curves:
        lines += ["", "## Compounding error", "",
                  "| run | step | episodes | error at first step | error at last step with all episodes running | max mean error |",
                  "|---|---|---|---|---|---|"]
        for c in curves:
            full = [m for m, n in zip(c["mean"], c["count"]) if n == c["count"][0]] if c["mean"] else []
            lines.append(f"| {c['run']} | {_fmt(c['ckpt_step'], '')} | "
                         f"{c.get('episodes')} | {_fmt(c['mean'][0] if c['mean'] else None)} | "
                         f"{_fmt(full[-1] if full else None)} | {_fmt(max(c['mean']) if c['mean'] else None)} |")
    lines.append("")
    return "\n".join(lines)
