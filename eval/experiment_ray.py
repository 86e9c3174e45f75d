"""`dopr experiment --backend ray`: every run of the experiment a Ray task.

A task runs `run_one`, the function the local backend calls, on the run's own folder, so a run gives the
same results wherever it runs, and one interrupted anywhere (its task killed, its node lost, this driver
stopped: Ray ends a driver's tasks with it) goes on from its latest checkpoint the next time. Each task
declares what it occupies, and Ray places it where that is free: the CPUs of its torch threads or of its
evaluations' simulator workers, whichever is more (training and evaluation take turns), and a GPU, or
a share of one, when it trains on cuda. Here the driver only keeps at most --max-parallel runs submitted
and starts a crashed run again (--retries) while the others go on.

Ray starts while the driver collects the demonstrations (`ray_starting`), and one worker per run slot
imports a run's code meanwhile: a local Ray takes seconds to start and a new worker seconds to import torch
and the run's code (`dopr bench ray`), time that otherwise adds to the experiment's.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
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


def run_slots(cfg: ExperimentConfig, ray, n_runs: int) -> int:
    """How many of `n_runs` runs are at once on the cluster: --max-parallel, or what its CPUs (and GPUs) hold."""
    cluster, need = ray.cluster_resources(), run_resources(cfg)
    fits = cluster.get("CPU", 1) // need["num_cpus"]
    if need["num_gpus"]:
        fits = min(fits, cluster.get("GPU", 0) // need["num_gpus"])
    return int(max(1, min(cfg.max_parallel or fits, fits, n_runs)))


def import_run_code() -> float:
    """In a Ray worker: import what a run imports (torch, the training and evaluation code); returns the wall
    clock when done. A worker that has run it starts a run in milliseconds instead of seconds."""
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import dopr.eval.evaluator  # noqa: F401
    import dopr.train.loop  # noqa: F401

    return time.time()


class _SigtermSetHere(logging.Filter):
    """ray.init off the main thread warns that it could not set its SIGTERM handler; `ray_starting` sets the
    same one (exit, so that Ray shuts down) on the main thread, so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


@contextlib.contextmanager
def ray_starting(cfg: ExperimentConfig, n_runs: int):
    """Starts (or joins) Ray on a thread, then warms a worker per run slot, while the caller goes on (collecting
    the demonstrations); yields `ready()`, which waits for Ray and returns the ray module. Ray is left at the
    end, as `ray_session` leaves it.

    The thread holds the session to the end and leaves it itself: a local Ray's processes are killed when the
    thread that started them ends (Ray ties them to it with PR_SET_PDEATHSIG, which is per thread)."""
    from dopr.ray_cluster import ray_session, require_ray

    require_ray(loopback=cfg.address is None)  # a missing extra is said here, at once
    up, finished = threading.Event(), threading.Event()
    started: dict = {}

    def hold():
        try:
            with ray_session(cfg.address) as ray:
                warm = ray.remote(import_run_code).options(**run_resources(cfg), name="dopr-warm-up")
                started["warm-ups"] = [warm.remote() for _ in range(run_slots(cfg, ray, n_runs))]
                started["ray"] = ray
                up.set()
                finished.wait()
        except BaseException as err:  # raised by ready(), on the caller's thread
            started["error"] = err
        finally:
            up.set()

    def ready():
        up.wait()
        if "error" in started:
            raise started["error"]
        return started["ray"]

    quiet = _SigtermSetHere()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    sigterm = signal.getsignal(signal.SIGTERM)
    if sigterm == signal.SIG_DFL:  # as Ray's own handler: SystemExit, so that Ray is left on the way out
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    thread = threading.Thread(target=hold, name="dopr-ray", daemon=True)
    thread.start()
    try:
        yield ready
    finally:
        finished.set()
        thread.join()
        signal.signal(signal.SIGTERM, sigterm)
        logging.getLogger("ray._private.worker").removeFilter(quiet)


def run_on_ray(cfg: ExperimentConfig, ray, runs: list[Run], progress: RunProgress) -> dict[str, str]:
    """Run every run as a Ray task on the connected `ray`; returns {run name: why} for those that failed every
    attempt."""
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
