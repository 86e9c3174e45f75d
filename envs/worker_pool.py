"""Simulator worker processes: one environment per process, with timeouts and restarts.

Collection and evaluation run their episodes here. A worker builds its object (`spec.build()`: an
environment and what runs it) after it started, never in the parent: forking a process that holds an
OpenGL context (or a CUDA context, for the policy) crashes, so workers start with the spawn method.
The main process sends a command to a worker and acts on whichever worker answers first; a worker
that dies (even by SIGKILL) or hangs past its deadline is killed, restarted and reported as a
`WorkerFault` in place of its reply. This module imports only the standard library, so a worker
starts fast; each worker gets one BLAS/OpenMP thread (the workers are the parallelism).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from multiprocessing.connection import wait as wait_connections

STARTUP_TIMEOUT_S = 180.0  # a worker imports numpy, mujoco and the task's simulator before its first ping


class WorkerFault(Exception):
    """A worker died, hung past its deadline, or raised inside the simulator."""


def simulator_error(traceback_text: str) -> WorkerFault:
    """An exception raised inside a worker's simulator: its last line (the exception) first, then the traceback."""
    return WorkerFault(traceback_text.strip().splitlines()[-1] + "\n" + traceback_text)


def open_pool(n_workers: int, spec, name: str, backend: str = "local", address: str | None = None):
    """The workers of one collection or evaluation: local processes (WorkerPool), or Ray actors on the cluster
    at `address` (dopr.envs.ray_pool.RayWorkerPool; a new local Ray without one). Both answer the same commands."""
    if backend == "ray":
        from dopr.envs.ray_pool import RayWorkerPool

        return RayWorkerPool(n_workers, spec, name=name, address=address)
    if backend != "local":
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    return WorkerPool(n_workers, spec, name=name)


@contextlib.contextmanager
def _one_thread_each():
    """Set for the spawn: numpy and torch read these variables when they load in the worker."""
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    saved = {name: os.environ.get(name) for name in threads}
    os.environ.update(threads)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker_main(conn, spec) -> None:
    # Ctrl-C goes to the whole process group; the main process decides what to keep and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # build the env before reporting ready: episode deadlines and rates then count stepping only
        target = spec.build()
    except Exception:  # the task cannot be built at all: a configuration error
        conn.send(("fatal", traceback.format_exc()))
        return
    while True:
        try:
            cmd, args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if cmd == "close":
            # Skip the interpreter's teardown (robosuite's and MuJoCo's objects, module finalizers):
            # it took ~0.8 s per worker and nothing is left to flush (videos are written, closed
            # and renamed at the end of their episode; replies are sent before the next command).
            conn.close()
            os._exit(0)
        try:
            result = os.getpid() if cmd == "ping" else getattr(target, cmd)(*args)
            conn.send(("ok", result))
        except Exception:  # report to the main process, which records the episode
            conn.send(("error", traceback.format_exc()))


class WorkerPool:
    """N worker processes, each holding the object `spec.build()` made there (an environment and what
    runs it). A command (name, args) runs `getattr(obj, name)(*args)` in the worker.

    `send(i, cmd)` sends a command to one worker and `receive(deadlines)` returns the replies of
    whichever workers answer first, so the caller acts on each as soon as it answers. A worker that
    dies or does not answer in time is killed, restarted, and reported as a `WorkerFault` in place of
    its reply, so the caller can record the episode and go on.
    """

    def __init__(self, n_workers: int, spec, name: str = "dopr-worker",
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        if n_workers < 1:
            raise ValueError(f"WorkerPool: n_workers must be >= 1, got {n_workers}")
        self.spec, self.name = spec, name
        self.startup_timeout_s = startup_timeout_s
        self.ctx = mp.get_context("spawn")
        self.procs: list = [None] * n_workers
        self.conns: list = [None] * n_workers
        self.n_restarts = 0
        try:
            for i in range(n_workers):
                self._start(i)
            self._wait_ready(range(n_workers))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def _start(self, i: int) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True, name=f"{self.name}-{i}")
        with _one_thread_each():
            proc.start()
        child.close()  # so the parent's end sees EOF when the worker dies
        self.procs[i], self.conns[i] = proc, parent

    def _wait_ready(self, indices) -> None:
        """Wait until the workers answer a ping, so that episode deadlines do not count Python's start-up."""
        deadline = time.monotonic() + self.startup_timeout_s
        for i in indices:
            self.conns[i].send(("ping", None))
        for i in indices:
            conn = self.conns[i]
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{self.name} {i} did not start within {self.startup_timeout_s:.0f} s")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError) as err:
                raise RuntimeError(f"{self.name} {i} died while starting (exit code "
                                   f"{self._exitcode(i)}): {err!r}") from None
            if status != "ok":
                raise RuntimeError(f"{self.name} {i} failed to start:\n{payload}")

    def _kill(self, i: int) -> None:
        proc, conn = self.procs[i], self.conns[i]
        try:
            conn.close()
        except OSError:
            pass
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)

    def restart(self, i: int) -> None:
        self._kill(i)
        self._start(i)
        self._wait_ready([i])
        self.n_restarts += 1

    def send(self, i: int, cmd: tuple) -> WorkerFault | None:
        """Send one command to worker i without waiting; a WorkerFault if the worker is gone."""
        try:
            self.conns[i].send(cmd)
        except (BrokenPipeError, EOFError, OSError) as err:
            return self._died(i, err)
        return None

    def receive(self, deadlines: dict[int, float]) -> dict:
        """Wait until at least one of the workers in `deadlines` (each with a command sent) answers
        or passes its deadline; return {i: reply payload or WorkerFault} for every one that did."""
        waiting = {self.conns[i]: i for i in deadlines}
        replies: dict = {}
        while waiting and not replies:
            timeout = max(0.0, min(deadlines.values()) - time.monotonic())
            for conn in wait_connections(list(waiting), timeout=timeout):
                i = waiting.pop(conn)
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError) as err:
                    replies[i] = self._died(i, err)
                    continue
                if status == "ok":
                    replies[i] = payload
                else:  # an exception inside the simulator: the worker lives, the episode failed
                    replies[i] = simulator_error(payload)
            now = time.monotonic()
            for conn, i in list(waiting.items()):
                if now >= deadlines[i]:
                    del waiting[conn]
                    replies[i] = self._fault(i, f"worker {i} (pid {self.procs[i].pid}) timed out")
        return replies

    def _died(self, i: int, err: Exception) -> WorkerFault:
        """The pipe to worker i broke. Whether the send or the receive noticed first is a race (a worker
        killed mid-command), so both report the same: the process, waited for briefly, and its exit code."""
        return self._fault(i, f"worker {i} (pid {self.procs[i].pid}) died (exit code {self._exitcode(i)}): {err!r}")

    def _exitcode(self, i: int):
        self.procs[i].join(timeout=2)
        return self.procs[i].exitcode

    def _fault(self, i: int, message: str) -> WorkerFault:
        self.restart(i)
        return WorkerFault(message)

    def close(self) -> None:
        for i, (proc, conn) in enumerate(zip(self.procs, self.conns)):
            if proc is None:
                continue
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            try:
                self.conns[i].close()
            except OSError:
                pass
            self.procs[i] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
