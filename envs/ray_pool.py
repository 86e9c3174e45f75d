"""Simulator workers as Ray actors: WorkerPool's commands, with the simulators spread over a Ray cluster.

Each actor holds the object `spec.build()` made inside it (an environment and what runs it), as a
WorkerPool process does, and runs the same commands; the caller (the evaluator) keeps the policy and
talks to the actors through `send` and `receive` exactly as it talks to local processes, so an episode's
outcome does not depend on where its simulator ran. An actor that dies (its process killed, its node
lost) or does not answer by its deadline is killed, replaced by a new one, and reported as a
`WorkerFault` in place of its reply; an exception inside the simulator is a WorkerFault too, and the
actor lives on. Needs the optional extra (dopr.ray_cluster.RAY_EXTRA).
"""

from __future__ import annotations

import os
import time

from dopr.envs.worker_pool import STARTUP_TIMEOUT_S, WorkerFault, simulator_error
from dopr.ray_cluster import ray_session


class _Holder:
    """The actor: one object built from the spec, and its commands."""

    def __init__(self, spec):
        self.target = spec.build()

    def ping(self) -> int:
        return os.getpid()

    def call(self, cmd: str, args: tuple):
        return getattr(self.target, cmd)(*args)


class RayWorkerPool:
    """N Ray actors of one CPU each, each holding the object `spec.build()` made there; WorkerPool's interface.

    Without `address` (and without Ray already initialized in this process) it starts a local Ray and stops
    it at `close()`; "auto" or HOST:PORT joins that cluster.
    """

    def __init__(self, n_workers: int, spec, name: str = "dopr-worker", startup_timeout_s: float = STARTUP_TIMEOUT_S,
                 address: str | None = None):
        if n_workers < 1:
            raise ValueError(f"RayWorkerPool: n_workers must be >= 1, got {n_workers}")
        self.spec, self.name, self.startup_timeout_s = spec, name, startup_timeout_s
        self._session = ray_session(address)
        self.ray = self._session.__enter__()
        # one CPU each, as a local worker process gets one thread; Ray itself never restarts or retries an actor:
        # a lost episode is recorded as failed, and the pool starts the replacement
        self._actor = self.ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_Holder)
        self.actors: list = [None] * n_workers
        self.pids: list = [None] * n_workers
        self.pending: dict = {}  # worker -> the reference of the reply it owes
        self.n_restarts = 0
        try:
            for i in range(n_workers):
                self.actors[i] = self._actor.remote(spec)
            self._wait_ready(range(n_workers))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def _wait_ready(self, indices) -> None:
        """Wait until the actors answer a ping (they are placed, and their simulators built)."""
        from ray.exceptions import RayError

        pings = {self.actors[i].ping.remote(): i for i in indices}
        ready, late = self.ray.wait(list(pings), num_returns=len(pings), timeout=self.startup_timeout_s)
        if late:
            raise RuntimeError(f"{self.name} {pings[late[0]]} did not start within {self.startup_timeout_s:.0f} s "
                               f"(each actor needs a free CPU in the Ray cluster: {len(self)} asked, cluster "
                               f"{self.ray.cluster_resources().get('CPU', 0):g})")
        for ref in ready:
            try:
                self.pids[pings[ref]] = self.ray.get(ref)
            except RayError as err:  # spec.build() raised in the actor: a configuration error
                raise RuntimeError(f"{self.name} {pings[ref]} failed to start:\n{err}") from None

    def restart(self, i: int) -> None:
        self.ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._actor.remote(self.spec)
        self._wait_ready([i])
        self.n_restarts += 1

    def send(self, i: int, cmd: tuple) -> WorkerFault | None:
        """Send one command to actor i without waiting. A dead actor is noticed when its reply is received."""
        name, args = cmd
        self.pending[i] = self.actors[i].call.remote(name, args)
        return None

    def receive(self, deadlines: dict[int, float]) -> dict:
        """Wait until at least one of the actors in `deadlines` (each with a command sent) answers or passes its
        deadline; return {i: reply payload or WorkerFault} for every one that did."""
        from ray.exceptions import RayError, RayTaskError

        waiting = {self.pending[i]: i for i in deadlines}
        replies: dict = {}
        while waiting and not replies:
            timeout = max(0.0, min(deadlines[i] for i in waiting.values()) - time.monotonic())
            first, _ = self.ray.wait(list(waiting), num_returns=1, timeout=timeout)
            # with the first, every other reply that is already there
            answered = self.ray.wait(list(waiting), num_returns=len(waiting), timeout=0)[0] if first else []
            for ref in answered:
                i = waiting.pop(ref)
                del self.pending[i]
                try:
                    replies[i] = self.ray.get(ref)
                except RayTaskError as err:  # an exception inside the simulator: the actor lives, the episode failed
                    replies[i] = simulator_error(err.traceback_str)
                except RayError as err:  # the actor is gone: its process died, or its node
                    replies[i] = self._fault(i, f"worker {i} (pid {self.pids[i]}) died: {err}")
            now = time.monotonic()
            for ref, i in list(waiting.items()):
                if now >= deadlines[i]:
                    del waiting[ref], self.pending[i]
                    replies[i] = self._fault(i, f"worker {i} (pid {self.pids[i]}) timed out")
        return replies

    def _fault(self, i: int, message: str) -> WorkerFault:
        self.restart(i)
        return WorkerFault(message)

    def close(self) -> None:
        # no teardown to wait for (videos are written and renamed at the end of their episode): kill at once
        for i, actor in enumerate(self.actors):
            if actor is not None:
                self.ray.kill(actor, no_restart=True)
                self.actors[i] = None
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
