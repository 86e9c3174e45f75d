"""The compounding-error curve: how far the policy's actions drift from the expert's as it runs.

The policy runs closed-loop from the demonstrations' initial states; before each executed action
the task's expert (a feedback controller that labels any state) says what it would do in the
state the policy actually reached. The error at rollout step t is |a_policy(t) - a_expert(t)|
(Euclidean norm, raw action units), averaged over the episodes still running at step t. A policy
that only imitates well on the demonstrations' own states shows a curve that grows with t.

Written to <checkpoint>/eval/compounding_error.json (the episodes themselves to
<checkpoint>/eval/compounding/), where `dopr report` finds it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dopr.atomic import write_json_atomic
from dopr.eval.config import EvalConfig
from dopr.eval.results import COMPOUNDING_FILE


def compounding_error_curve(action_errors) -> dict:
    """Per-step mean, std and count of the action error over episodes of different lengths.

    action_errors: {episode: [error at step 0, 1, ...]} or a list of such lists.
    """
    series = list(action_errors.values()) if isinstance(action_errors, dict) else list(action_errors)
    series = [np.asarray(s, dtype=float) for s in series if len(s)]
    length = max((len(s) for s in series), default=0)
    mean, std, count = [], [], []
    for t in range(length):
        at_t = np.array([s[t] for s in series if len(s) > t])
        mean.append(float(at_t.mean()))
        std.append(float(at_t.std()))
        count.append(int(len(at_t)))
    return {"step": list(range(length)), "mean": mean, "std": std, "count": count}


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
