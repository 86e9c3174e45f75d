"""What an evaluation worker process runs (dopr.envs.worker_pool): one environment, episode by episode.

The evaluator keeps the policy in the main process and sends each worker a chunk of actions; the
worker executes them (stopping early when its episode ends) and sends back only the last few
observations, so one control round trip costs one message per worker instead of one per step.
The environment, and any rendering context, is created inside the worker (`EnvSpec.build`). This
module imports no torch, so a worker starts fast.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from dopr.atomic import atomic_path
from dopr.envs.episode import EpisodeLoop
from dopr.temporal_ensemble import TemporalEnsembler

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
    # ACT's decay: each chunk sent is blended with the earlier ones and one action is executed (None: the chunk)
    temporal_ensemble: float | None = None

    def build(self) -> "RolloutWorker":
        """Runs in the worker process (dopr.envs.worker_pool)."""
        worker = RolloutWorker(self)
        worker.build()
        return worker


@dataclass
class Episode:
    """One episode to run: its index in the evaluation, its seed, an optional initial state."""

    index: int
    seed: int
    init_state: np.ndarray | None = None
    demo_index: int | None = None
    record_video: bool = False


class RolloutWorker:
    """Runs one environment inside the worker process: `reset(episode)`, then `act(chunk)` until done."""

    def __init__(self, spec: EnvSpec):
        self.spec = spec
        self.env = None
        self.expert = None
        self.episode: Episode | None = None
        self.ensembler = TemporalEnsembler(spec.temporal_ensemble) if spec.temporal_ensemble is not None else None

    def build(self):
        from dopr.envs import make  # chooses the OpenGL backend (MUJOCO_GL) before mujoco loads

        if self.spec.label_with_expert:
            from dopr.envs import make_expert

            self.expert = make_expert(self.spec.task)
        self.env = make(self.spec.task, obs=self.spec.obs, horizon=self.spec.horizon,
                        image_size=self.spec.image_size)
        self.loop = EpisodeLoop(self.env, self.spec.stop_on_success, max_steps=self.spec.horizon)

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
        if self.ensembler is not None:
            self.ensembler.reset()
        self.loop.start(obs)
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
        """Execute actions until the chunk or the episode ends; return the last observations. With temporal
        ensembling the chunk is this step's prediction and one action, its blend with the earlier ones, runs."""
        loop, observations = self.loop, []
        if self.ensembler is not None:
            actions = [self.ensembler.update(actions)]
        for a in actions:
            if self.expert is not None:
                label = np.asarray(self.expert.act(self.env), dtype=np.float64)
                self.action_errors.append(float(np.linalg.norm(np.asarray(a, np.float64) - label)))
            obs, _, _ = loop.step(a)
            observations.append(self._select(obs))
            if self.frames is not None:
                self._render()
            if loop.done:
                break
        reply = {"obs": observations[-keep_last:], "done": loop.done, "steps": loop.steps, "return": loop.ret}
        if loop.done:
            reply["record"] = self._finish()
        return reply

    def _finish(self) -> dict:
        record = {
            "success": bool(self.loop.success),
            "steps": int(self.loop.steps),
            "return": float(self.loop.ret),
            "time_to_success": self.loop.time_to_success,
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
