"""Hand-built `dopr train` run folders with chosen evaluations, for the comparison table and the report.

Each folder has what training and `dopr eval` leave: config.json, ckpt-*/meta.json, and per evaluated checkpoint
eval/results.json and eval/episodes.jsonl, written by the evaluator's own code (EvalResult, EpisodeLog) from
chosen episodes. No policy weights: the readers under test never load one.
"""

from __future__ import annotations

import json
import os

EPISODES = 10
SEED_BASE = 100000


def episodes(successes: int, mean_return: float = 0.0, n: int = EPISODES) -> list[dict]:
    """n episode records, the first `successes` successful, returns mean_return + 10 (i - (n - 1) / 2): their mean
    is mean_return and they differ, so that an interval over them has a width."""
    return [{"episode": i, "seed": SEED_BASE + i, "success": i < successes, "steps": 5 if i < successes else 20,
             "return": mean_return + 10 * (i - (n - 1) / 2), "time_to_success": 5 if i < successes else None,
             "error": None} for i in range(n)]


def write_evaluation(ckpt_dir: str, task: str, records: list[dict], requested: int | None = None) -> None:
    """results.json and episodes.jsonl of an evaluation of `requested` episodes (default: all of `records`) that
    finished `records`; fewer than requested is an incomplete (interrupted) evaluation."""
    from dopr.atomic import write_json_atomic
    from dopr.eval.metrics import success_stats
    from dopr.eval.results import EPISODES_FILE, RESULTS_FILE, EpisodeLog, EvalResult

    requested = requested or len(records)
    out = os.path.join(ckpt_dir, "eval")
    result = EvalResult(task=task, **vars(success_stats(records)),
                        protocol={"init": "random", "horizon": 20, "seed_base": SEED_BASE},
                        interrupted=len(records) < requested, episodes_requested=requested,
                        complete=len(records) >= requested)
    EpisodeLog(os.path.join(out, EPISODES_FILE), records).close()
    write_json_atomic(os.path.join(out, RESULTS_FILE), result.summary())


def write_run(root, name: str, *, task: str, optim: str, seed: int, checkpoints: dict[str, tuple[int, float]],
              lr: float = 3e-4, policy: str = "mlp", configuration: str | None = None) -> str:
    """A run folder with config.json and, for each checkpoint name, its meta.json: {name: (step, val loss)};
    `configuration`: the compared configuration's name, when it is more than the optimizer."""
    from dopr.atomic import write_json_atomic

    run = os.path.join(str(root), name)
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"optim": optim, "configuration": configuration or optim, "policy": policy, "seed": seed,
                   "lr": lr}, f)
    for ckpt, (step, val_loss) in checkpoints.items():
        os.makedirs(os.path.join(run, ckpt), exist_ok=True)
        write_json_atomic(os.path.join(run, ckpt, "meta.json"), {"step": step, "val_loss": val_loss, "task": task})
    return run


def write_study(root, task: str, outcomes: dict[str, dict[int, tuple]], val_loss=None) -> list[str]:
    """Runs evaluated as `dopr experiment` leaves them with eval_every 1000 and 3000 steps: ckpt-0001000 and
    ckpt-0002000 evaluated, ckpt-0003000 not (training evaluates ckpt-final, of the same step).

    outcomes: {optimizer: {training seed: (outcome at 1000, 2000, 3000)}}, an outcome being a number of successful
    episodes (an int) or a mean return (a float), or a list of episode records as they are.
    val_loss(optimizer, seed, step) gives each checkpoint's validation loss (default: 1 / step)."""
    val_loss = val_loss or (lambda optim, seed, step: 1.0 / step)
    runs = []
    for optim, by_seed in outcomes.items():
        for seed, at_steps in by_seed.items():
            steps = {"ckpt-0001000": 1000, "ckpt-0002000": 2000, "ckpt-0003000": 3000, "ckpt-final": 3000}
            run = write_run(root, f"{task}-{optim}-s{seed}", task=task, optim=optim, seed=seed,
                            checkpoints={c: (s, val_loss(optim, seed, s)) for c, s in steps.items()})
            for ckpt, outcome in zip(("ckpt-0001000", "ckpt-0002000", "ckpt-final"), at_steps):
                if isinstance(outcome, list):
                    records = outcome
                elif isinstance(outcome, float):
                    records = episodes(EPISODES // 2, outcome)
                else:
                    records = episodes(outcome)
                write_evaluation(os.path.join(run, ckpt), task, records, requested=EPISODES)
            runs.append(run)
    return runs
