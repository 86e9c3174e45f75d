"""robosuite tasks as gymnasium environments with dict observations, success and state access.

Choices, and why:
- Panda arm, robosuite 1.5's default composite controller for it (BASIC with OSC_POSE on the arm):
  7-dim action in [-1, 1]: 3 position deltas (x 0.05 m), 3 axis-angle deltas (x 0.5 rad) in the
  robot base frame, gripper (-1 open, +1 close). control_freq 20 Hz.
- The episode never terminates on success (`terminated` is always False, as robomimic's env):
  `info["success"]` is robosuite's `_check_success()` at every step, and whoever runs the episode
  (collector, evaluator) decides whether to stop on it. `truncated` is True at the horizon.
- `hard_reset=False`: reset() re-places objects and the robot without rebuilding the MuJoCo model
  (~100x faster). The model itself (e.g. Lift's randomized cube size) is drawn once from
  `model_seed` (default 0), the same in every process, so a state saved by one env instance
  (get_state) means the same scene in any other: replay and reset-to-demo work across workers.
- Seeding: robosuite draws object placement and the robot's initial joint noise from its own
  numpy Generators (env.rng and the placement samplers' rng; shared/FINDINGS.md). `reset(seed=s)`
  reseeds all of them in place, so the same seed gives the same initial state.
- Images keep robosuite's default (OpenGL, bottom-up) row order, the convention of robomimic's
  datasets, so policies trained on imported robomimic data see the same images here.
"""

from __future__ import annotations

import logging

import gymnasium
import numpy as np

from dopr.envs.rendering import configure_gl_backend, require_offscreen_rendering
from dopr.envs.task_spec import TaskSpec, checked_state

CAMERAS = ("agentview", "robot0_eye_in_hand")
LOWDIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
IMAGE_KEYS = tuple(f"{camera}_image" for camera in CAMERAS)


def _task(name: str, env_id: str, horizon: int, demo_steps: int, success: str,
          **robosuite_kwargs) -> TaskSpec:
    return TaskSpec(name=name, kind="robosuite", env_id=env_id, horizon=horizon,
                    lowdim_keys=LOWDIM_KEYS, image_keys=IMAGE_KEYS, action_dim=7,
                    control_freq=20.0, demo_steps=demo_steps,
                    extra={"success": success, "robosuite_kwargs": robosuite_kwargs})


# Horizons are robomimic's: 400 for lift, can, square; 700 for the longer multi-stage task.
# demo_steps: mean length of the scripted expert's successful-or-not episodes over seeds 0-99
# (python -m dopr.envs.measure_experts).
ROBOSUITE_TASKS: dict[str, TaskSpec] = {
    "lift": _task("lift", "Lift", 400, 37, "cube lifted 4 cm above the table"),
    "can": _task("can", "PickPlaceCan", 400, 176, "can inside its target bin"),
    "square": _task("square", "NutAssemblySquare", 400, 147,
                    "square nut around the square peg, gripper away from it"),
    "stack": _task("stack", "Stack", 400, 87, "red cube resting on the green cube, released"),
    "nut_assembly": _task("nut_assembly", "NutAssembly", 700, 350,
                          "both nuts around their pegs (square and round), gripper away"),
}


class _DropBelowError(logging.Filter):
    """robosuite logs several WARNING/INFO lines at import and per env; keep only errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def import_robosuite():
    """Import robosuite with a chosen GL backend and without its import-time log noise."""
    configure_gl_backend()
    # robosuite's DefaultLogger resets the level of "robosuite_logs" at import, but a filter on
    # the logger survives that, so install it before the first import.
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _DropBelowError) for f in logger.filters):
        logger.addFilter(_DropBelowError())
    import robosuite

    return robosuite


class RobosuiteEnv(gymnasium.Env):
    """One robosuite task (a TaskSpec of kind "robosuite") as a gymnasium.Env.

    Observations: dict of float64 arrays for `spec.lowdim_keys` ("object" is robosuite's
    "object-state"); with obs="image" also uint8 (image_size, image_size, 3) arrays for
    `spec.image_keys` ("<camera>_image"). `self.sim` and `self.robosuite_env` give the experts
    access to the simulator.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, spec: TaskSpec, seed: int | None = None, obs: str = "lowdim",
                 horizon: int | None = None, image_size: int = 84, model_seed: int = 0,
                 hard_reset: bool = False, **robosuite_kwargs):
        if spec.kind != "robosuite":
            raise ValueError(f"task {spec.name!r} is a {spec.kind} task, not a robosuite one")
        if obs not in ("lowdim", "image"):
            raise ValueError(f"obs must be 'lowdim' or 'image', got {obs!r}")
        if obs == "image":
            require_offscreen_rendering()
        suite = import_robosuite()
        self.task_spec = spec
        self.obs_mode = obs
        self.horizon = int(horizon or spec.horizon)
        self.image_size = int(image_size)
        images = obs == "image"
        kwargs = dict(
            robots="Panda",
            controller_configs=suite.load_composite_controller_config(robot="Panda"),
            has_renderer=False,
            has_offscreen_renderer=images,
            use_camera_obs=images,
            use_object_obs=True,
            camera_names=list(CAMERAS),
            camera_heights=self.image_size,
            camera_widths=self.image_size,
            control_freq=int(spec.control_freq),
            horizon=self.horizon,
            ignore_done=True,  # this wrapper owns the horizon
            hard_reset=hard_reset,
            reward_shaping=False,
            seed=model_seed,
        )
        kwargs.update(spec.extra.get("robosuite_kwargs", {}))
        kwargs.update(robosuite_kwargs)
        self.robosuite_env = suite.make(spec.env_id, **kwargs)
        self.sim = self.robosuite_env.sim
        self.obs_keys = tuple(spec.lowdim_keys) + (tuple(spec.image_keys) if images else ())

        low, high = self.robosuite_env.action_spec
        self.action_space = gymnasium.spaces.Box(low.astype(np.float32), high.astype(np.float32))
        if self.action_space.shape != (spec.action_dim,):
            raise RuntimeError(
                f"{spec.name}: robosuite's action has shape {self.action_space.shape}, "
                f"the task spec says ({spec.action_dim},): check the controller config"
            )
        self.robosuite_env.reset()
        first = self._fresh_observations()
        spaces = {}
        for key, value in first.items():
            if value.dtype == np.uint8:
                spaces[key] = gymnasium.spaces.Box(0, 255, value.shape, np.uint8)
            else:
                spaces[key] = gymnasium.spaces.Box(-np.inf, np.inf, value.shape, np.float64)
        self.observation_space = gymnasium.spaces.Dict(spaces)
        self._state_size = self.get_state().shape[0]
        self._pending_seed = seed
        self._t = 0

    # --- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """New episode; `seed` (or the constructor's seed, on the first reset) fixes its start."""
        super().reset(seed=seed)
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        else:
            self._pending_seed = None
        if seed is not None:
            self._reseed(int(seed))
        self.robosuite_env.reset()
        obs = self._fresh_observations()
        self._t = 0
        return obs, {"success": False}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.task_spec.action_dim,):
            raise ValueError(
                f"{self.task_spec.name}: action has shape {action.shape}, "
                f"expected ({self.task_spec.action_dim},)"
            )
        raw_obs, reward, _, _ = self.robosuite_env.step(action)
        self._t += 1
        info = {"success": self.is_success()}
        return self._convert(raw_obs), float(reward), False, self._t >= self.horizon, info

    def render(self):
        """agentview camera, uint8 HxWx3, upright (for videos); needs obs="image"."""
        if self.obs_mode != "image":
            raise RuntimeError(f"{self.task_spec.name}: render() needs an env made with "
                               "obs='image' (robosuite builds its offscreen renderer only then)")
        return self.sim.render(camera_name=CAMERAS[0], height=self.image_size,
                               width=self.image_size)[::-1]

    def close(self):
        self.robosuite_env.close()

    # --- simulator state -----------------------------------------------------------------------
    def is_success(self) -> bool:
        return bool(self.robosuite_env._check_success())

    def get_state(self) -> np.ndarray:
        """robosuite's flattened simulator state [time, qpos, qvel], robomimic's `states` format."""
        return np.asarray(self.sim.get_state().flatten(), dtype=np.float64)

    def reset_to_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Start a new episode in `state` (from get_state, possibly of another env instance).

        Resets robosuite's internal variables (controller, gripper command) without drawing from
        the episode generators, then sets the state: stepping the same actions from the first
        state of a recorded episode reproduces it.
        """
        state = checked_state(state, self._state_size, self.task_spec.name)
        env = self.robosuite_env
        env.deterministic_reset = True  # skip placement sampling and joint noise
        try:
            env.reset()
        finally:
            env.deterministic_reset = False
        self.sim.set_state_from_flattened(state)
        self.sim.forward()
        # The arm controllers were built at the reset pose: they cache the end-effector pose the
        # next goal is relative to, and OSC's null-space posture target (`initial_joint`, the
        # episode's first joint configuration). Rebuild both at the restored state, as a normal
        # reset does at the episode's start (exact for a first state; for a mid-episode state the
        # posture target becomes that state's joints, a small difference in null-space torque).
        for robot in env.robots:
            for name, controller in robot.composite_controller.part_controllers.items():
                controller.update(force=True)
                if "gripper" not in name and hasattr(controller, "initial_joint"):
                    controller.initial_joint = np.array(controller.joint_pos)
                controller.reset_goal()
        self._t = 0
        return self._fresh_observations()

    # --- helpers -------------------------------------------------------------------------------
    def _reseed(self, seed: int) -> None:
        """Reseed, in place, every Generator robosuite draws an episode's start from."""
        env = self.robosuite_env
        generators = [env.rng]
        sampler = getattr(env, "placement_initializer", None)
        if sampler is not None:
            generators.append(sampler.rng)
            generators.extend(s.rng for s in getattr(sampler, "samplers", {}).values())
        distinct = list({id(g): g for g in generators}.values())
        children = np.random.SeedSequence(seed).spawn(len(distinct))
        for generator, child in zip(distinct, children):
            generator.bit_generator.state = np.random.default_rng(child).bit_generator.state

    def _fresh_observations(self) -> dict[str, np.ndarray]:
        """Observations of the current simulator state, after a reset or a state change.

        robosuite computes the object-to-gripper observables (NutAssembly, PickPlace) from a pose
        cache that is refreshed later in the same pass, so one pass after a jump in state gives
        zeros or the previous pose for them; the second pass is right.
        """
        self.robosuite_env._get_observations(force_update=True)
        return self._convert(self.robosuite_env._get_observations(force_update=True))

    def _convert(self, raw: dict) -> dict[str, np.ndarray]:
        obs = {}
        for key in self.obs_keys:
            source = "object-state" if key == "object" else key
            if source not in raw:
                raise KeyError(
                    f"{self.task_spec.name}: robosuite gave no observation {source!r}; "
                    f"it has {sorted(raw)}"
                )
            value = raw[source]
            if key.endswith("_image"):
                obs[key] = np.ascontiguousarray(value, dtype=np.uint8)
            else:
                obs[key] = np.asarray(value, dtype=np.float64)
        return obs


def make_robosuite_env(spec: TaskSpec, seed: int | None = None, obs: str = "lowdim",
                       horizon: int | None = None, image_size: int = 84, **kw) -> RobosuiteEnv:
    return RobosuiteEnv(spec, seed=seed, obs=obs, horizon=horizon, image_size=image_size, **kw)
