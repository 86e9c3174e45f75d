"""`dopr experiment --backend ray`: every run of the experiment a Ray task.

A task runs `run_one`, the function the local backend calls, on the run's own folder, so a run gives the
same results wherever it runs, and one interrupted anywhere (its task killed, its node lost, this driver
stopped: Ray ends a driver's tasks with it) goes on from its latest checkpoint the next time. Each task
declares what it occupies, and Ray places it where that is free: the CPUs of its torch threads or of its
evaluations' simulator workers, whichever is more (training and evaluation take turns), and a GPU, or
a share of one, when it trains on cuda. Here the driver only keeps at most --max-parallel runs submitted
and starts a crashed run again (--retries) while the others go on.
"""

from __future__ import annotations

import sys
from collections import deque

from dopr.eval.experiment import ExperimentConfig, Run, RunProgress, run_one


def check_ray_options(cfg: ExperimentConfig) -> None:
    if cfg.device.startswith("cuda:"):
        raise ValueError(f"--device {cfg.device} with --backend ray: give --device cuda, Ray gives each run its GPU")
    if cfg.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {cfg.retries}")
    if cfg.max_parallel is not None and cfg.max_parallel < 1:
        raise ValueError(f"--max-parallel must be >= 1, got {cfg.max_parallel}")
    if cfg.gpus_per_run <= 0:
        raise ValueError(f"--gpus-per-run must be > 0, got {cfg.gpus_per_run}")


def run_resources(cfg: ExperimentConfig) -> dict:
    """The Ray resources one run declares."""
    return {"num_cpus": max(1, cfg.threads, cfg.workers),
            "num_gpus": cfg.gpus_per_run if cfg.device.startswith("cuda") else 0}


def run_on_ray(cfg: ExperimentConfig, runs: list[Run], progress: RunProgress) -> dict[str, str]:
    """Run every run as a Ray task; returns {run name: why} for those that failed every attempt."""
    from dopr.ray_cluster import ray_session

    with ray_session(cfg.address) as ray:
        from ray.exceptions import RayError

        task = ray.remote(run_one)
        # Ray's own retries stay off: a crash is reported here before the run starts again
        options = dict(run_resources(cfg), max_retries=0)
        waiting = deque((run, 1) for run in runs)  # (run, attempt)
        submitted: dict = {}  # the task's reference -> (run, attempt)
        failed: dict[str, str] = {}
        while waiting or submitted:
            while waiting and len(submitted) < (cfg.max_parallel or len(runs)):
                run, attempt = waiting.popleft()
                # the name is the worker process's title while it runs (ray::dopr-run:NAME)
                submitted[task.options(**options, name=f"dopr-run:{run.name}").remote(cfg, run)] = (run, attempt)
            (ref,), _ = ray.wait(list(submitted), num_returns=1)
            run, attempt = submitted.pop(ref)
            try:
                progress.finished(run.name, ray.get(ref))
            except RayError as err:
                why = _reason(err)
                if attempt <= cfg.retries:
                    print(f"[experiment] {run.name}: crashed ({why}); starting it again from its latest checkpoint "
                          f"(attempt {attempt + 1} of {cfg.retries + 1})", flush=True)
                    waiting.append((run, attempt + 1))
                else:
                    print(f"[experiment] {run.name}: {err}", file=sys.stderr, flush=True)
                    failed[run.name] = why
                    progress.finished(run.name, f"FAILED after {attempt} attempt(s): {why}")
    return failed


def _reason(err) -> str:
    """One line for a failed task: the exception it raised, or why Ray lost it (its process died, its node)."""
    from ray.exceptions import RayTaskError

    if isinstance(err, RayTaskError):
        message = str(err.cause).strip()
        return type(err.cause).__name__ + (f": {message.splitlines()[0]}" if message else "")
    return str(err).strip().splitlines()[0]
