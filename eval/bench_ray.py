"""`dopr bench ray`: what Ray adds, next to the local equivalent, measured in one run.

- starting a local Ray (or joining --address's cluster);
- a no-op task's round trip (submit, run, get), the floor of every Ray call;
- a run's start-up: a task that imports what `dopr experiment`'s run imports (torch, the training and
  evaluation code), in a new worker process (what a run pays once) and in a reused one;
- one evaluation control round: a command to a simulator worker and its reply, through a Ray actor
  (dopr.envs.ray_pool) against a local worker process's pipe (dopr.envs.worker_pool); an evaluation
  pays one per worker per policy call.
Medians over --repeats; the machine is shared, so the ratios mean more than the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time


class _Echo:
    """A worker spec whose object answers at once: the pools' transport, without a simulator."""

    def build(self):
        return self

    def echo(self, x):
        return x


def _noop():
    return None


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _round_trip_ms(pool, repeats: int) -> float:
    payload = {"obs": [[0.0] * 64] * 2}  # about what one control round sends back (To=2 low-dim observations)

    def once():
        pool.send(0, ("echo", (payload,)))
        pool.receive({0: time.monotonic() + 60})

    return _median_ms(once, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dopr bench ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--repeats", type=int, default=200, help="round trips per median (default %(default)s)")
    p.add_argument("--cold-starts", type=int, default=3,
                   help="run start-ups measured in new worker processes (default %(default)s)")
    args = p.parse_args(argv)

    from dopr.envs.ray_pool import RayWorkerPool
    from dopr.envs.worker_pool import WorkerPool
    from dopr.eval.experiment_ray import import_run_code
    from dopr.ray_cluster import ray_session

    t0 = time.perf_counter()
    with ray_session(args.address) as ray:
        start_s = time.perf_counter() - t0
        noop = ray.remote(_noop)
        noop_ms = _median_ms(lambda: ray.get(noop.remote()), args.repeats)
        # max_calls=1: the worker exits after the call, so every call starts a new process, as a run's first task does
        cold_task = ray.remote(max_calls=1)(import_run_code)
        warm_task = ray.remote(import_run_code)
        cold = []
        for _ in range(args.cold_starts):
            submitted = time.time()
            cold.append(ray.get(cold_task.remote()) - submitted)
        ray.get(warm_task.remote())
        submitted = time.time()
        warm = ray.get(warm_task.remote()) - submitted
        with RayWorkerPool(1, _Echo()) as pool:
            actor_ms = _round_trip_ms(pool, args.repeats)
    with WorkerPool(1, _Echo()) as pool:
        pipe_ms = _round_trip_ms(pool, args.repeats)

    where = f"the cluster at {args.address}" if args.address else "a new local Ray"
    print(f"Ray overhead ({where}; medians of {args.repeats}):")
    print(f"  {'joining' if args.address else 'starting'} Ray: {start_s:.1f} s")
    print(f"  no-op task round trip: {noop_ms:.2f} ms")
    print(f"  a run's start-up (import torch, training and evaluation code): new worker "
          f"{statistics.median(cold):.1f} s (of {len(cold)}), reused worker {warm * 1000:.0f} ms")
    print(f"  evaluation round trip per worker: Ray actor {actor_ms:.2f} ms, local process pipe {pipe_ms:.2f} ms "
          f"({actor_ms / pipe_ms:.1f}x)")
    return 0
