"""`dopr bench collect`: collection throughput against the raw simulator step rate.

Raw rate: one process stepping the task's env with random actions (no expert, no store), timed
over the whole loop including the resets at the horizon. It is measured before and after the
collection runs, and the mean is the reference, because the machine is shared and noisy.
Collection rate: `dopr collect` into a temporary store, env steps / wall time, end to end
(including worker start-up) and steady (after the first episode came back). Goal from the issue:
collection >= 0.8 x workers x raw.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def raw_step_rate(task: str, n_steps: int, seed: int = 0) -> float:
    """Env steps per second of a single process with random actions (no expert, no store)."""
    import numpy as np

    from dopr.envs import make

    env = make(task, seed=seed)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, size=(n_steps, *low.shape)).astype(env.action_space.dtype)
    env.reset(seed=seed)
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    seconds = time.perf_counter() - start
    env.close()
    return n_steps / seconds


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dopr bench collect",
        description="Collection env-steps/s per worker count against the raw single-process "
        "simulator step rate (goal: >= 0.8 x workers x raw).",
    )
    p.add_argument("--task", default="lift", help="task to collect (default lift)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per collection run (default 20)")
    p.add_argument("--raw-steps", type=int, default=1000, help="steps of the raw-rate measurement")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]

    from dopr.envs.collect import CollectConfig, collect

    raw_before = raw_step_rate(args.task, args.raw_steps, args.seed)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dopr-bench-collect-") as tmp:
        for workers in worker_counts:
            out = Path(tmp) / f"w{workers}.zarr"
            cfg = CollectConfig(task=args.task, n_episodes=args.episodes, out=str(out),
                                workers=workers, seed=args.seed, progress=False)
            runs.append((workers, collect(cfg)))
    raw_after = raw_step_rate(args.task, args.raw_steps, args.seed)
    raw = (raw_before + raw_after) / 2

    print(f"task {args.task}: raw single-process env.step rate {raw:.0f} steps/s "
          f"(before {raw_before:.0f}, after {raw_after:.0f}; random actions, no expert, no store)")
    header = (f"{'workers':>7} {'episodes':>8} {'steps':>7} {'wall s':>7} {'e2e st/s':>9} "
              f"{'steady st/s':>11} {'steady/raw':>10} {'goal x raw':>10} {'met':>4} {'store ms/ep':>11}")
    print(header)
    for workers, s in runs:
        e2e = s.env_steps / s.seconds
        # steps that arrived after the first episode, over the time after it: start-up excluded
        first_len = s.env_steps / max(s.attempts, 1)
        steady_time = max(s.seconds - s.first_result_seconds, 1e-9)
        steady = (s.env_steps - first_len) / steady_time if s.attempts > 1 else e2e
        goal = 0.8 * max(workers, 1)
        print(f"{workers:>7} {s.added:>8} {s.env_steps:>7} {s.seconds:>7.2f} {e2e:>9.0f} "
              f"{steady:>11.0f} {steady / raw:>10.2f} {goal:>10.2f} {'yes' if steady / raw >= goal else 'no':>4} "
              f"{1000 * s.store_seconds / max(s.attempts, 1):>11.1f}")
    print("e2e includes worker start-up (spawn, imports, env construction); steady excludes it. "
          "Collection includes the expert's compute and the store writes; raw has neither. "
          "store ms/ep: the parent's time per episode appending to the zarr store (serial: "
          "it caps the rate when episodes are short).")
    return 0
