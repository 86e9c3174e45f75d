"""Ray, an optional extra: importing it, and joining or starting the cluster that `--backend ray` runs on.

    with ray_session(address) as ray:   # None: a new local Ray on this machine; "auto" or HOST:PORT: a cluster
        ...                              # Ray tasks and actors

A session that finds Ray already initialized in this process (a test's, or a caller's that set it up
itself) uses it and leaves it running; one that started or joined a cluster leaves it at the end, which
stops a local Ray it started and only disconnects from a cluster it joined.
"""

from __future__ import annotations

import contextlib
import os
import sys

RAY_EXTRA = 'pip install -e ".[ray]"'
# Ray reads it at import: false makes a new local Ray listen on 127.0.0.1 only (its switch for laptops), so a
# single-machine run opens no port to the network.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray starts its workers 15 nice levels below its own processes. On a machine shared with other jobs that starves
# the runs (measured here: training steps 20-40x slower than the same run outside Ray next to a study at normal
# priority), so a local Ray gives its workers the priority of the command that started it, as the local backend
# runs at; `nice dopr experiment ...` still lowers both. A cluster sets it at `ray start` (docs/results/ray).
WORKER_NICENESS = "RAY_worker_niceness"


def require_ray(loopback: bool = False):
    """The ray module; a missing extra is an error that says how to install it."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ModuleNotFoundError:
        raise SystemExit(f"--backend ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Ray, connected: to the cluster at `address` ("auto": the one `ray start` made on this machine, or
    HOST:PORT), else to a new local Ray with `num_cpus` CPUs (default: the machine's)."""
    ray = require_ray(loopback=address is None)
    if ray.is_initialized():
        yield ray
        return
    if address is None:
        os.environ.setdefault(WORKER_NICENESS, "0")  # read by the raylet that ray.init starts
        # "local" rather than None: never join a cluster that RAY_ADDRESS or an earlier `ray start` points to
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()
