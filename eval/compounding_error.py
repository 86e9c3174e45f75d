"""The compounding-error curve: how far the policy's actions drift from the expert's as it runs.

The policy runs closed-loop from the demonstrations' initial states; before each executed action
the task's expert (a feedback controller that labels any state) says what it would do in the
state the policy actually reached. The error at rollout step t is |a_policy(t) - a_expert(t)|
(Euclidean norm, raw action units) over the episodes still running at step t. A policy that only
imitates well on the demonstrations' own states shows a curve that grows with t.

Episodes end when they succeed, so late steps rest on fewer episodes, and mostly on failing ones:
after a few dozen steps a mean can be one outlier among two or three episodes. Each step therefore
records the median and the interquartile range next to the mean, and the count it rests on; and a
curve is shown (figure, report) only while at least `min_running(n)` of its n episodes still run:
a quarter of them and at least MIN_RUNNING (all of them when fewer were run).

Written to <checkpoint>/eval/compounding_error.json (the episodes themselves to
<checkpoint>/eval/compounding/), where `dopr report` finds it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from dopr.atomic import write_json_atomic
from dopr.eval.config import EvalConfig
from dopr.eval.results import COMPOUNDING_FILE

MIN_RUNNING = 5  # episodes a shown point rests on, at least (all of them when fewer were run)
MIN_RUNNING_FRACTION = 0.25  # ... and at least this fraction of the curve's episodes


def min_running(n_episodes: int) -> int:
    """The fewest episodes still running at a step for that step of the curve to be shown."""
    return min(n_episodes, max(MIN_RUNNING, math.ceil(MIN_RUNNING_FRACTION * n_episodes)))


def compounding_error_curve(action_errors) -> dict:
    """Per-step mean, std, median, quartiles and count of the action error over episodes of different lengths.

    action_errors: {episode: [error at step 0, 1, ...]} or a list of such lists.
    """
    series = list(action_errors.values()) if isinstance(action_errors, dict) else list(action_errors)
    series = [np.asarray(s, dtype=float) for s in series if len(s)]
    length = max((len(s) for s in series), default=0)
    curve = {"step": list(range(length)), "mean": [], "std": [], "median": [], "q25": [], "q75": [], "count": []}
    for t in range(length):
        at_t = np.array([s[t] for s in series if len(s) > t])
        q25, median, q75 = np.percentile(at_t, [25, 50, 75])
        for name, value in zip(("mean", "std", "median", "q25", "q75"), (at_t.mean(), at_t.std(), median, q25, q75)):
            curve[name].append(float(value))
        curve["count"].append(int(len(at_t)))
    curve["min_running"] = min_running(curve["count"][0]) if length else 0
    return curve


def shown_part(curve: dict) -> dict:
    """The steps of a curve (as read from compounding_error.json) that rest on enough episodes: step, count,
    center (the median; the mean for files written before the median was recorded), low and high (the
    quartiles; mean -/+ std for older files) and `center_name`, cut where fewer than min_running remain."""
    count = curve["count"]
    keep = sum(1 for n in count if n >= min_running(count[0])) if count else 0  # count never rises with t
    if "median" in curve:
        center, lo, hi, name = curve["median"], curve["q25"], curve["q75"], "median"
    else:
        center, name = curve["mean"], "mean"
        lo = [m - s for m, s in zip(curve["mean"], curve["std"])]
        hi = [m + s for m, s in zip(curve["mean"], curve["std"])]
    return {"step": curve["step"][:keep], "count": count[:keep], "center": center[:keep], "low": lo[:keep],
            "high": hi[:keep], "center_name": name, "min_running": min_running(count[0]) if count else 0}


def measure_compounding_error(checkpoint: str, demos: str, cfg: EvalConfig | None = None, *,
                              out_path: str | None = None, ema: bool = True) -> dict:
    """Run the checkpoint from the demonstrations' initial states with expert labelling (cfg's episodes,
    default 20; its init, demos and labelling are set here).

    Returns (and writes atomically to out_path, default <checkpoint>/eval/compounding_error.json)
    the curve plus the protocol and the success of these rollouts.
    """
    from dopr.eval.evaluator import evaluate_checkpoint

    cfg = dataclasses.replace(cfg or EvalConfig(episodes=20), init="demos", demos=demos, label_with_expert=True)
    result = evaluate_checkpoint(checkpoint, cfg, out_dir=os.path.join(checkpoint, "eval", "compounding"), ema=ema)
    curve = compounding_error_curve(result.action_errors)
    report = {
        "checkpoint": os.path.abspath(checkpoint),
        "task": result.task,
        "demos": os.path.abspath(demos),
        "episodes": result.n_episodes,
        "horizon": result.protocol["horizon"],
        "success_rate": result.success_rate,
        "error": "euclidean norm of (policy action - expert label), raw action units, before each executed step",
        **curve,
    }
    out_path = out_path or os.path.join(checkpoint, "eval", COMPOUNDING_FILE)
    write_json_atomic(out_path, report)
    return report
