"""gymnasium MuJoCo tasks behind the same interface as the robosuite tasks.

gymnasium's MuJoCo environments have rewards but no notion of success, so each task here adds
one (documented on its TaskSpec in GYM_TASKS and implemented in `_SuccessCheck` below):

- reacher (Reacher-v5): the fingertip is within REACH_TOLERANCE (0.02 m, the sum of the fingertip
  and target sphere radii, i.e. they touch) of the target for REACH_HOLD_STEPS (10) consecutive
  control steps (0.2 s). Horizon 100 steps at 50 Hz.
- inverted_double_pendulum (InvertedDoublePendulum-v5): the pole tip stays above gymnasium's
  termination height (y > 1) for the whole horizon; `info["success"]` becomes True at the last
  step of the horizon and the episode terminates (failure) when the tip falls. Horizon 500 steps
  at 20 Hz (25 s).
- inverted_pendulum (InvertedPendulum-v5, started with reset_noise_scale 0.1 instead of 0.01):
  the pole stays within gymnasium's +-0.2 rad for the whole horizon, as above. Horizon 500 steps
  at 25 Hz (20 s).

- humanoid, walker2d, hopper, ant (Humanoid-v5, Walker2d-v5, Hopper-v5, Ant-v5): locomotion with
  gymnasium's observation and reward; the expert is an RL-trained actor (`dopr expert train`).
  Return is the primary metric. Success is the named criterion "survived": the episode reaches the
  horizon (1000 steps) without gymnasium terminating it (the robot falling or leaving its healthy
  range), as for the pendulums.

Pusher-v5 is not a task (yet): the scripted push tried for it (operational-space control of the
fork, behind the object and then towards the goal) succeeded on 0 of 20 seeded episodes, far from
the 95% every task's expert must reach. An IK check shows the wrist's joint limits do not let the
fork lie level at table height for objects near the arm's base.

Like robosuite's `_check_success`, `info["success"]` is the check at the current step; whoever runs
the episode decides whether to stop on it (the collector does).

Observations are dicts of numpy arrays: "observation" is gymnasium's own observation vector; with
obs="image" an "image" key (uint8 HxWx3, offscreen render of the task's default camera) is added.
`get_state()` is MuJoCo's mjSTATE_INTEGRATION state (time, qpos, qvel, act, warm start, ctrl,
...), so that `reset_to_state(state)` followed by the same actions reproduces a rollout exactly.
"""

from __future__ import annotations

import gymnasium
import mujoco
import numpy as np

from dopr.envs.rendering import require_offscreen_rendering
from dopr.envs.task_spec import TaskSpec, checked_state

REACH_TOLERANCE = 0.02  # m: fingertip (r=0.01) and target (r=0.009) spheres touch
REACH_HOLD_STEPS = 10
# gymnasium terminates these when the pole falls: InvertedDoublePendulum when the tip's height
# y <= 1, InvertedPendulum when |pole angle| > 0.2 rad
PENDULUM_TASKS = ("inverted_double_pendulum", "inverted_pendulum")
# locomotion: gymnasium terminates when the robot leaves its healthy range; survival to the horizon
# is success, return the primary metric. Their expert is an RL-trained actor (dopr.envs.expert_actor).
LOCOMOTION_TASKS = {"humanoid": ("Humanoid-v5", 17, 66.67), "walker2d": ("Walker2d-v5", 6, 125.0),
                    "hopper": ("Hopper-v5", 3, 125.0), "ant": ("Ant-v5", 8, 20.0)}
SURVIVAL_TASKS = PENDULUM_TASKS + tuple(LOCOMOTION_TASKS)

GYM_TASKS: dict[str, TaskSpec] = {
    "reacher": TaskSpec(
        name="reacher",
        kind="gymnasium",
        env_id="Reacher-v5",
        horizon=100,
        lowdim_keys=("observation",),
        image_keys=("image",),
        action_dim=2,
        control_freq=50.0,  # timestep 0.01 s x frame_skip 2
        demo_steps=30,
        extra={
            "success": "fingertip within 0.02 m of the target for 10 consecutive steps",
        },
    ),
    "inverted_double_pendulum": TaskSpec(
        name="inverted_double_pendulum",
        kind="gymnasium",
        env_id="InvertedDoublePendulum-v5",
        horizon=500,
        lowdim_keys=("observation",),
        image_keys=("image",),
        action_dim=1,
        control_freq=20.0,  # timestep 0.01 s x frame_skip 5
        demo_steps=500,
        extra={"success": "pole tip stays above y=1 for the whole horizon"},
    ),
    "inverted_pendulum": TaskSpec(
        name="inverted_pendulum",
        kind="gymnasium",
        env_id="InvertedPendulum-v5",
        horizon=500,
        lowdim_keys=("observation",),
        image_keys=("image",),
        action_dim=1,
        control_freq=25.0,  # timestep 0.02 s x frame_skip 2
        demo_steps=500,
        # gymnasium's default start (+-0.01) is nearly upright; 0.1 makes demonstrations recover
        extra={"success": "pole angle stays within +-0.2 rad for the whole horizon",
               "make_kwargs": {"reset_noise_scale": 0.1}},
    ),
}
GYM_TASKS.update({
    name: TaskSpec(name=name, kind="gymnasium", env_id=env_id, horizon=1000, lowdim_keys=("observation",),
                   image_keys=("image",), action_dim=action_dim, control_freq=freq, demo_steps=1000,
                   policy_chunks=(1, 1, 1),
                   extra={"success": "survived: reaches the horizon without the episode terminating",
                          "expert": "rl", "metric": "return"})
    for name, (env_id, action_dim, freq) in LOCOMOTION_TASKS.items()
})


class _SuccessCheck:
    """Per-task success, evaluated after every step; `reset()` at the start of every episode."""

    def __init__(self, task: str, model: mujoco.MjModel, horizon: int):
        self.task = task
        self.horizon = horizon
        if task == "reacher":
            self._a = model.body("fingertip").id
            self._b = model.body("target").id
        elif task not in SURVIVAL_TASKS:
            raise ValueError(f"no success check for gymnasium task {task!r}")
        self.reset()

    def reset(self) -> None:
        self._held = 0

    def __call__(self, data: mujoco.MjData, t: int, terminated: bool) -> bool:
        if self.task in SURVIVAL_TASKS:
            # gymnasium terminates when the pole or robot falls: reaching the horizon is success
            return (not terminated) and t >= self.horizon
        dist = np.linalg.norm(data.xpos[self._a, :2] - data.xpos[self._b, :2])
        self._held = self._held + 1 if dist < REACH_TOLERANCE else 0
        return self._held >= REACH_HOLD_STEPS


class GymTaskEnv(gymnasium.Env):
    """A gymnasium MuJoCo environment with dict observations, a success check and state access."""

    def __init__(self, spec: TaskSpec, seed: int | None = None, obs: str = "lowdim",
                 horizon: int | None = None, image_size: int = 84):
        if obs not in ("lowdim", "image"):
            raise ValueError(f"obs must be 'lowdim' or 'image', got {obs!r}")
        self.task_spec = spec
        self.horizon = int(horizon or spec.horizon)
        self.obs_mode = obs
        kwargs = {}
        if obs == "image":
            require_offscreen_rendering()
            kwargs = dict(render_mode="rgb_array", width=image_size, height=image_size)
        # .unwrapped drops gymnasium's TimeLimit/OrderEnforcing/checker wrappers: this class keeps
        # its own horizon, and the wrappers cost per-step time the collector does not need.
        kwargs.update(spec.extra.get("make_kwargs", {}))
        self._env = gymnasium.make(spec.env_id, **kwargs).unwrapped
        self.model: mujoco.MjModel = self._env.model
        self.data: mujoco.MjData = self._env.data
        self.action_space = self._env.action_space
        inner = self._env.observation_space
        spaces = {"observation": gymnasium.spaces.Box(-np.inf, np.inf, inner.shape, np.float64)}
        if obs == "image":
            spaces["image"] = gymnasium.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gymnasium.spaces.Dict(spaces)
        self.obs_keys = tuple(spaces)
        self._success = _SuccessCheck(spec.name, self.model, self.horizon)
        self._state_spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._state_size = mujoco.mj_stateSize(self.model, self._state_spec)
        self._pending_seed = seed
        self._t = 0

    # --- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        else:
            self._pending_seed = None
        vec, info = self._env.reset(seed=seed)
        self._t = 0
        self._success.reset()
        info = dict(info, success=False)
        return self._obs(vec), info

    def step(self, action):
        _, reward, terminated, _, info = self._env.step(np.asarray(action, dtype=np.float64))
        # mj_step leaves positions, forces and the mass matrix at the start of its last substep;
        # recompute them so the observation (and an expert reading data) match the state exactly,
        # as after reset_to_state. Reward and termination stay gymnasium's own.
        mujoco.mj_forward(self.model, self.data)
        vec = self._env._get_obs()
        self._t += 1
        info["success"] = self._success(self.data, self._t, terminated)
        truncated = self._t >= self.horizon
        return self._obs(vec), float(reward), bool(terminated), truncated, info

    def render(self):
        return self._env.render()

    def close(self):
        self._env.close()

    # --- simulator state -----------------------------------------------------------------------
    def get_state(self) -> np.ndarray:
        state = np.empty(self._state_size, dtype=np.float64)
        mujoco.mj_getState(self.model, self.data, state, self._state_spec)
        return state

    def reset_to_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Put the simulator in `state` (from get_state) and start a new episode there."""
        state = checked_state(state, self._state_size, self.task_spec.name)
        mujoco.mj_setState(self.model, self.data, state, self._state_spec)
        mujoco.mj_forward(self.model, self.data)
        self._t = 0
        self._success.reset()
        return self._obs(self._env._get_obs())

    def observation_vector(self) -> np.ndarray:
        """gymnasium's observation of the current state (what an RL-trained expert reads)."""
        return self._env._get_obs()

    def _obs(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        obs = {"observation": np.asarray(vec, dtype=np.float64)}
        if self.obs_mode == "image":
            obs["image"] = np.ascontiguousarray(self._env.render(), dtype=np.uint8)
        return obs


def make_gym_env(spec: TaskSpec, seed: int | None = None, obs: str = "lowdim",
                 horizon: int | None = None, image_size: int = 84) -> GymTaskEnv:
    """Build the gymnasium task `spec` (one of GYM_TASKS); `seed` seeds the first reset()."""
    if spec.name not in GYM_TASKS:
        raise ValueError(f"unknown gymnasium task {spec.name!r}; known: {sorted(GYM_TASKS)}")
    return GymTaskEnv(spec, seed=seed, obs=obs, horizon=horizon, image_size=image_size)
