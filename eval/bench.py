"""`dopr bench eval`: evaluator throughput against the raw simulator, and batched policy latency.

Raw rate: one process stepping the task's env with random actions (dopr.envs.bench.raw_step_rate),
through the same wrapper the workers step (observations and success check included), measured
right before and right after each evaluator run, since the machine is shared and noisy; the ratio
of a run uses the mean of the two raw rates measured next to it. Evaluator rate: env steps / wall
time of `evaluate_policy` from its workers' start to its last episode's end (start-up and closing
the workers are printed separately), with a trained
checkpoint (--checkpoint) or a freshly initialized MLPPolicy of the default size (same compute
per call; its actions are random, so its episodes run to the horizon). Goal from the issue:
evaluator >= 0.8 x workers x raw on CPU. Latency: median of predict_action on a batch of B
observation histories, per device.
"""

from __future__ import annotations

import argparse
import time


def _policy(task: str, checkpoint: str | None):
    from dopr.envs import make, task_spec
    from dopr.policies import MLPPolicy, PolicyConfig, load_policy

    if checkpoint:
        return load_policy(checkpoint), f"checkpoint {checkpoint}"
    spec = task_spec(task)
    obs, _ = make(task).reset(seed=0)
    shapes = {k: list(obs[k].shape) for k in spec.lowdim_keys}
    cfg = PolicyConfig(kind="mlp", obs_shapes=shapes, action_dim=spec.action_dim)
    return MLPPolicy(cfg).eval(), f"fresh MLPPolicy ({cfg.mlp_layers}x{cfg.mlp_hidden_dim}, To={cfg.n_obs_steps}, " \
                                  f"Tp={cfg.horizon}, Ta={cfg.n_action_steps})"


def _raw_rate_in_process(task, n_steps, barrier, results):
    from dopr.envs import make
    from dopr.envs.bench import raw_step_rate

    make(task).close()  # imports and first model build happen before the common start
    barrier.wait()
    results.put(raw_step_rate(task, n_steps))


def parallel_raw_rate(task: str, n_processes: int, n_steps: int) -> float:
    """Summed steps/s of n raw-rate processes stepping at the same time: what this machine can
    give n simulators right now (below n x raw when other work holds cores)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n_processes), ctx.Queue()
    procs = [ctx.Process(target=_raw_rate_in_process, args=(task, n_steps, barrier, results), daemon=True)
             for _ in range(n_processes)]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    return total


def policy_latency_ms(policy, batch: int, device: str, repeats: int = 30) -> float:
    """Median milliseconds of one predict_action on `batch` observation histories."""
    import torch

    cfg = policy.config
    policy = policy.to(device)
    obs = {k: torch.randn(batch, cfg.n_obs_steps, *shape, device=device) for k, shape in cfg.obs_shapes.items()}
    times = []
    for i in range(repeats + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            policy.predict_action(obs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:  # warm-up calls excluded
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dopr bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lift", help="task (default lift)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint folder (default: a fresh MLPPolicy)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--episodes-per-worker", type=int, default=2, help="episodes per worker per run (default 2)")
    p.add_argument("--horizon", type=int, default=100, help="episode length (default 100)")
    p.add_argument("--batches", default="1,8,32", help="policy batch sizes for the latency table (default 1,8,32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the policy process (default 1)")
    args = p.parse_args(argv)

    import torch

    from dopr.envs.bench import raw_step_rate
    from dopr.eval.config import EvalConfig
    from dopr.eval.evaluator import evaluate_policy

    torch.set_num_threads(args.threads)
    policy, what = _policy(args.task, args.checkpoint)
    task = args.task
    print(f"dopr bench eval: task {task}, policy {what}, horizon {args.horizon}, torch threads {args.threads}")
    print(f"{'workers':>7} {'raw steps/s':>11} {'eval steps/s':>12} {'ratio':>6} {'goal':>5} "
          f"{'startup s':>9} {'close s':>7} {'policy ms/call':>14} {'schedule':>9} {'raw parallel':>12}")
    raw_steps = max(200, args.horizon * 2)
    for w in [int(x) for x in args.workers.split(",")]:
        raw_before = raw_step_rate(task, n_steps=raw_steps)
        cfg = EvalConfig(episodes=w * args.episodes_per_worker, workers=w, horizon=args.horizon, progress=False)
        result = evaluate_policy(policy, task, cfg)
        raw = (raw_before + raw_step_rate(task, n_steps=raw_steps)) / 2
        parallel = parallel_raw_rate(task, w, raw_steps) if w > 1 else raw
        t = result.timing
        ratio = t["env_steps_per_s"] / (w * raw)
        print(f"{w:>7} {raw:>11.1f} {t['env_steps_per_s']:>12.1f} {ratio:>6.2f} {'ok' if ratio >= 0.8 else 'MISS':>5} "
              f"{t['startup_s']:>9.1f} {t['shutdown_s']:>7.2f} {t['policy_ms_per_call']:>14.2f} "
              f"{t['schedule']:>9} {parallel:>12.1f}")
    print("ratio = eval steps/s / (workers x raw steps/s); goal >= 0.8. "
          f"{__import__('os').cpu_count()} CPU cores on this machine.\n"
          "raw parallel: summed steps/s of `workers` raw processes at once, right after the run (the "
          "machine's ceiling for that many simulators now; below workers x raw when other work holds cores).")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batches = [int(b) for b in args.batches.split(",")]
    print(f"\nbatched policy latency per control step (median ms of predict_action), kind {policy.config.kind}")
    print(f"{'device':>7} " + " ".join(f"{'B=' + str(b):>8}" for b in batches))
    for device in devices:
        print(f"{device:>7} " + " ".join(f"{policy_latency_ms(policy, b, device):>8.2f}" for b in batches))
    if not torch.cuda.is_available():
        print("(no GPU here: GPU latency not measured)")
    return 0
