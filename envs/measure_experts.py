"""Measure the experts' success on seeded episodes (the issue asks >= 95% of 100 per task).

    python -m dopr.envs.measure_experts --task lift --episodes 100
    python -m dopr.envs.measure_experts --episodes 100          # every robosuite task
    python -m dopr.envs.measure_experts --task humanoid --episodes 50 --first-seed 100000   # an RL expert's return

Episode i uses env.reset(seed=first_seed + i); an episode stops at the first successful step or
at the task's horizon. No rendering.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from tqdm import tqdm

from dopr.envs.collect import ACTION_KEY, EXECUTED_ACTION_KEY, rollout
from dopr.envs.tasks import TASKS, make, make_expert


def run_episode(env, expert, seed: int, stop_on_success: bool = True) -> dict:
    """One seeded expert episode (the collector's rollout): success, steps, return, the visited
    states (the initial one, then one after each step) and the executed actions."""
    result = rollout(env, expert, seed, stop_on_success=stop_on_success)
    episode = result["episode"]
    return {"success": result["success"], "steps": result["length"],
            "return": float(episode["reward"].sum(dtype=np.float64)),
            "states": np.concatenate([episode["state"], result["final_state"][None]]),
            "actions": episode.get(EXECUTED_ACTION_KEY, episode[ACTION_KEY])}


def measure_success(task: str, episodes: int = 100, first_seed: int = 0, noise_std: float = 0.0,
                    progress: bool = True, expert_path: str | None = None) -> dict:
    """Success and return of task's expert over seeds first_seed .. first_seed + episodes - 1
    (return is the locomotion tasks' metric; the reward a robosuite task sums is its own)."""
    env = make(task)
    expert = make_expert(task, seed=first_seed, noise_std=noise_std, expert_path=expert_path)
    successes, steps, returns, failed = 0, [], [], []
    start = time.perf_counter()
    bar = tqdm(range(first_seed, first_seed + episodes), desc=f"{task} expert",
               disable=not progress)
    for seed in bar:
        result = run_episode(env, expert, seed)
        successes += result["success"]
        steps.append(result["steps"])
        returns.append(result["return"])
        if not result["success"]:
            failed.append(seed)
        bar.set_postfix(success=f"{successes}/{seed - first_seed + 1}")
    seconds = time.perf_counter() - start
    env.close()
    return {"task": task, "episodes": episodes, "successes": successes,
            "success_rate": successes / episodes, "mean_steps": float(np.mean(steps)),
            "max_steps": int(np.max(steps)), "failed_seeds": failed, "returns": returns,
            "mean_return": float(np.mean(returns)),
            "return_sd": float(np.std(returns, ddof=1)) if episodes > 1 else 0.0,
            "steps_per_s": float(np.sum(steps) / seconds), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dopr.envs.measure_experts",
        description="Measure the experts' success on seeded episodes (seeds first-seed ... "
                    "first-seed+episodes-1), stopping each at success or the task's horizon.")
    parser.add_argument("--task", action="append", choices=sorted(TASKS),
                        help="task to measure (repeatable; default: every robosuite task)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--noise-std", type=float, default=0.0,
                        help="std of the seeded Gaussian noise on the executed actions")
    parser.add_argument("--expert", default=None,
                        help="RL-expert folder for the locomotion tasks (default out/experts/<task>)")
    args = parser.parse_args(argv)
    tasks = args.task or [name for name, spec in TASKS.items() if spec.kind == "robosuite"]
    for task in tasks:
        r = measure_success(task, args.episodes, args.first_seed, args.noise_std, expert_path=args.expert)
        print(f"{task}: {r['successes']}/{r['episodes']} successful "
              f"({100 * r['success_rate']:.0f}%), mean {r['mean_steps']:.0f} steps "
              f"(max {r['max_steps']}, horizon {TASKS[task].horizon}), "
              f"return {r['mean_return']:.1f} (sd {r['return_sd']:.1f}), "
              f"{r['steps_per_s']:.0f} steps/s, failed seeds {r['failed_seeds'][:20]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
