"""Simulator worker processes for closed-loop evaluation: one environment per process.

The evaluator keeps the policy in the main process and sends each worker a chunk of actions; the
worker executes them (stopping early when its episode ends) and sends back only the last few
observations, so one control round trip costs one message per worker instead of one per step.

Workers start with the spawn method: forking a process that holds an OpenGL context (or a CUDA
context, for the policy) crashes. The environment, and any rendering context, is created inside the
worker after it started, never in the parent. This module imports no torch, so a worker starts fast.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections

import numpy as np

from dopr.atomic import atomic_path

STARTUP_TIMEOUT_S = 180.0  # a worker imports numpy, mujoco and the task's simulator before its first ping
VIDEO_SIZE = 256  # pixels, when the evaluator renders the scene itself


@dataclass
class EnvSpec:
    """How a worker builds and runs its environment."""

    task: str
    obs: str = "lowdim"  # "lowdim" or "image"
    horizon: int = 400
    image_size: int = 84
    obs_keys: tuple[str, ...] | None = None  # keys sent back to the policy (None: all)
    stop_on_success: bool = True  # end the episode at the first success (time to success = its step)
    label_with_expert: bool = False  # also record |action - expert.act(env)| per step
    video_dir: str | None = None  # where mp4s of episodes with record_video go


@dataclass
class Episode:
    """One episode to run: its index in the evaluation, its seed, an optional initial state."""

    index: int
    seed: int
    init_state: np.ndarray | None = None
    demo_index: int | None = None
    record_video: bool = False


class WorkerFault(Exception):
    """A worker died, hung past its deadline, or raised inside the simulator."""


# --------------------------------------------------------------------------------------------
# worker side


class _EpisodeRunner:
    """Runs one environment inside the worker process."""

    def __init__(self, spec: EnvSpec):
        self.spec = spec
        self.env = None
        self.expert = None
        self.episode: Episode | None = None

    def build(self):
        from dopr.envs import make  # chooses the OpenGL backend (MUJOCO_GL) before mujoco loads

        if self.spec.label_with_expert:
            from dopr.envs import make_expert

            self.expert = make_expert(self.spec.task)
        self.env = make(self.spec.task, obs=self.spec.obs, horizon=self.spec.horizon,
                        image_size=self.spec.image_size)

    def _select(self, obs: dict) -> dict:
        keys = self.spec.obs_keys
        if keys is None:
            return {k: np.asarray(v) for k, v in obs.items()}
        missing = [k for k in keys if k not in obs]
        if missing:
            raise KeyError(f"task {self.spec.task!r}: observation has no key(s) {missing}; "
                           f"it has {sorted(obs)}")
        return {k: np.asarray(obs[k]) for k in keys}

    def reset(self, episode: Episode) -> dict:
        self.episode = episode
        obs, _ = self.env.reset(seed=int(episode.seed))
        if episode.init_state is not None:
            obs = self.env.reset_to_state(episode.init_state)
        if self.expert is not None:
            self.expert.reset()
        self.steps, self.ret, self.success, self.time_to_success = 0, 0.0, False, None
        self.action_errors: list[float] = []
        self.frames: list[np.ndarray] | None = None
        self.video_error: str | None = None
        if episode.record_video:
            self.frames = []
            self._render()
        self.t0 = time.perf_counter()
        return self._select(obs)

    def _render(self):
        first = None
        try:
            try:
                frame = self.env.render()
            except Exception as err:  # e.g. an env made without an offscreen renderer
                first, frame = err, None
            if frame is None:
                frame = self._render_scene()
            self.frames.append(np.asarray(frame, dtype=np.uint8))
        except Exception as err:  # a video is optional; the episode goes on
            why = f"env.render() raised {type(first).__name__}: {first}; " if first is not None else ""
            self.video_error = f"rendering failed: {why}{type(err).__name__}: {err}"
            self.frames = None

    def _render_scene(self) -> np.ndarray:
        """Render the MuJoCo scene directly when the env was made without rgb_array rendering."""
        import mujoco

        env, camera = self.env, -1  # -1: MuJoCo's free camera
        model, data = getattr(env, "model", None), getattr(env, "data", None)
        sim = getattr(env, "sim", None)  # robosuite wraps the raw structs in its MjSim
        if not isinstance(model, mujoco.MjModel) and sim is not None:
            model, data = getattr(sim.model, "_model", None), getattr(sim.data, "_data", None)
            camera = "agentview" if model is not None and mujoco.mj_name2id(
                model, mujoco.mjtObj.mjOBJ_CAMERA, "agentview") >= 0 else -1
        if not isinstance(model, mujoco.MjModel) or not isinstance(data, mujoco.MjData):
            raise RuntimeError("the env exposes no MuJoCo model/data to render")
        if getattr(self, "_renderer_model", None) is not model:  # a hard reset rebuilds the model
            self._renderer = mujoco.Renderer(model, VIDEO_SIZE, VIDEO_SIZE)
            self._renderer_model = model
        self._renderer.update_scene(data, camera=camera)
        return self._renderer.render()

    def act(self, actions: np.ndarray, keep_last: int) -> dict:
        """Execute actions until the chunk or the episode ends; return the last observations."""
        observations = []
        done = False
        for a in actions:
            if self.expert is not None:
                label = np.asarray(self.expert.act(self.env), dtype=np.float64)
                self.action_errors.append(float(np.linalg.norm(np.asarray(a, np.float64) - label)))
            obs, reward, terminated, truncated, info = self.env.step(a)
            self.steps += 1
            self.ret += float(reward)
            observations.append(self._select(obs))
            if self.frames is not None:
                self._render()
            if info.get("success", False) and not self.success:
                self.success, self.time_to_success = True, self.steps
            if (self.success and self.spec.stop_on_success) or terminated or truncated \
                    or self.steps >= self.spec.horizon:
                done = True
                break
        reply = {"obs": observations[-keep_last:], "done": done, "steps": self.steps, "return": self.ret}
        if done:
            reply["record"] = self._finish()
        return reply

    def _finish(self) -> dict:
        record = {
            "success": bool(self.success),
            "steps": int(self.steps),
            "return": float(self.ret),
            "time_to_success": self.time_to_success,
            "wall_s": round(time.perf_counter() - self.t0, 4),
        }
        if self.expert is not None:
            record["action_errors"] = self.action_errors
        if self.episode.record_video:
            record["video"] = self._write_video()
            if self.video_error:
                record["video_error"] = self.video_error
        return record

    def _write_video(self) -> str | None:
        if not self.frames:
            return None
        try:
            import imageio.v2 as imageio

            os.makedirs(self.spec.video_dir, exist_ok=True)
            path = os.path.join(self.spec.video_dir, f"episode_{self.episode.index:04d}.mp4")
            fps = float(getattr(self.env, "metadata", {}).get("render_fps") or 20)
            with atomic_path(path) as tmp:
                imageio.mimwrite(tmp, self.frames, fps=fps, macro_block_size=1)
            return path
        except Exception as err:
            self.video_error = f"writing the video failed: {type(err).__name__}: {err}"
            return None


def _worker_main(conn, spec: EnvSpec) -> None:
    # Ctrl-C goes to the whole process group; the main process decides what to keep and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner = _EpisodeRunner(spec)
    try:
        # build the env before reporting ready: episode deadlines and rates then count stepping only
        runner.build()
    except Exception:  # the task cannot be built at all: a configuration error
        conn.send(("fatal", traceback.format_exc()))
        return
    while True:
        try:
            cmd, payload = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if cmd == "close":
            # Skip the interpreter's teardown (robosuite's and MuJoCo's objects, module finalizers):
            # it took ~0.8 s per worker and nothing is left to flush (videos are written, closed
            # and renamed at the end of their episode; replies are sent before the next command).
            conn.close()
            os._exit(0)
        try:
            if cmd == "reset":
                result = runner.reset(payload)
            elif cmd == "act":
                result = runner.act(*payload)
            elif cmd == "ping":
                result = os.getpid()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", result))
        except Exception:  # report to the main process, which records the episode
            conn.send(("error", traceback.format_exc()))


# --------------------------------------------------------------------------------------------
# main-process side


class EnvPool:
    """N worker processes, each holding one environment.

    `send(i, cmd)` sends a command to one worker and `receive(deadlines)` returns the replies of
    whichever workers answer first, so the caller acts on each as soon as it answers. A worker that
    dies or does not answer in time is killed, restarted, and reported as a `WorkerFault` in place of
    its reply, so the caller can record the episode and go on.
    """

    def __init__(self, n_workers: int, spec: EnvSpec, startup_timeout_s: float = STARTUP_TIMEOUT_S):
        if n_workers < 1:
            raise ValueError(f"EnvPool: n_workers must be >= 1, got {n_workers}")
        self.spec = spec
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
        proc = self.ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True,
                                name=f"dopr-eval-worker-{i}")
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
                raise RuntimeError(f"evaluation worker {i} did not start within {self.startup_timeout_s:.0f} s")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError) as err:
                raise RuntimeError(f"evaluation worker {i} died while starting (exit code "
                                   f"{self._exitcode(i)}): {err!r}") from None
            if status != "ok":
                raise RuntimeError(f"evaluation worker {i} failed to start:\n{payload}")

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
                    replies[i] = WorkerFault(payload.strip().splitlines()[-1] + "\n" + payload)
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
