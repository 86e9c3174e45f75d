"""Controller-based experts for the gymnasium tasks: feedback policies that label any state.

Each expert reads the simulator state from `env.unwrapped.model/data` (a GymTaskEnv) and returns
the clean action label. With `noise_std > 0`, `expert.noisy(action)` adds seeded Gaussian noise
(clipped to the action range) for the action that is executed, so demonstrations visit and
recover from off-nominal states while the stored label stays the expert's clean action.

- reacher: analytic inverse kinematics of the 2-link arm for the target, then computed-torque
  joint PD through MuJoCo's mass matrix, bias and passive forces.
- humanoid, walker2d, hopper, ant: an RL-trained actor (`dopr expert train`), read from its
  folder (actor.safetensors + expert.json, no pickle) by dopr.envs.expert_actor.
- inverted_double_pendulum, inverted_pendulum: discrete-time LQR on the MuJoCo model linearized
  at the upright equilibrium (central differences over one control period, i.e. frame_skip
  simulator steps with the action held; mjd_transitionFD does not support their RK4 integrator).

Noise is on the executed action in units of the action (actions are in [-1, 1] for reacher and
the double pendulum, [-3, 3] for the single pendulum).
"""

from __future__ import annotations

import mujoco
import numpy as np
import scipy.linalg

from dopr.envs.task_spec import TaskSpec


class GymExpert:
    """Base: `reset()` at the start of an episode, `act(env)` -> clean label, `noisy(action)`."""

    def __init__(self, seed: int | None = None, noise_std: float = 0.0):
        self.noise_std = float(noise_std)
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, env) -> np.ndarray:
        raise NotImplementedError

    def noisy(self, action: np.ndarray) -> np.ndarray:
        """The action to execute: the label plus seeded Gaussian noise, clipped to the actuator range."""
        if self.noise_std <= 0:
            return action
        noisy = action + self.noise_std * self.rng.standard_normal(action.shape)
        return _clip(noisy, self.low, self.high)


def _clip(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    # np.clip's dispatch overhead is several times the work on a 1-7 element action
    return np.minimum(np.maximum(x, low), high)


def _ctrl_range(model: mujoco.MjModel) -> tuple[np.ndarray, np.ndarray]:
    return model.actuator_ctrlrange[:, 0].copy(), model.actuator_ctrlrange[:, 1].copy()


class ReacherExpert(GymExpert):
    """Analytic inverse kinematics of the 2-link arm, then computed-torque joint PD.

    A straight task-space PD can drive the elbow into its joint limit (+-3 rad) and circle
    there; solving for the elbow configuration closest to the current one avoids that.
    Torques map to actions through the motor gear (200 per unit action).
    """

    KP = 400.0  # 1/s^2: natural frequency 20 rad/s, critically damped
    KD = 2 * 20.0

    def act(self, env) -> np.ndarray:
        env = env.unwrapped
        model, data = env.model, env.data
        if not hasattr(self, "_dofs"):
            self._dofs = np.array([model.joint("joint0").dofadr[0], model.joint("joint1").dofadr[0]])
            self._base = model.body("body0").id
            # link lengths: body1's offset in body0 and the fingertip's offset in body1
            self._l1 = float(np.linalg.norm(model.body("body1").pos[:2]))
            self._l2 = float(np.linalg.norm(model.body("fingertip").pos[:2]))
            self._elbow_limit = float(model.jnt_range[model.joint("joint1").id, 1])
            self._target = model.body("target").id
            self._gear = model.actuator_gear[:, 0].copy()
            self.low, self.high = _ctrl_range(model)
        q = data.qpos[self._dofs]
        q_des = self._inverse_kinematics(data.xpos[self._target, :2] - data.xpos[self._base, :2], q)
        err = q_des - q
        err[0] = (err[0] + np.pi) % (2 * np.pi) - np.pi  # joint0 is unlimited: shortest way round
        qdd = self.KP * err - self.KD * data.qvel[self._dofs]
        M = np.zeros((model.nv, model.nv))
        mujoco.mj_fullM(model, M, data.qM)
        M = M[np.ix_(self._dofs, self._dofs)]
        tau = M @ qdd + data.qfrc_bias[self._dofs] - data.qfrc_passive[self._dofs]
        return _clip(tau / self._gear, self.low, self.high)

    def _inverse_kinematics(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        l1, l2 = self._l1, self._l2
        c2 = np.clip((p @ p - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
        best, best_cost = None, np.inf
        for sign in (1.0, -1.0):
            q2 = np.clip(sign * np.arccos(c2), -self._elbow_limit, self._elbow_limit)
            q1 = np.arctan2(p[1], p[0]) - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
            d1 = (q1 - q[0] + np.pi) % (2 * np.pi) - np.pi
            cost = d1**2 + (q2 - q[1]) ** 2
            if cost < best_cost:
                best, best_cost = np.array([q[0] + d1, q2]), cost
        return best


_LQR_GAINS: dict[int, tuple[mujoco.MjModel, np.ndarray]] = {}  # id(model) -> (model, K)


class PendulumLQRExpert(GymExpert):
    """u = -K (x - x_upright), K from the discrete Riccati equation of the linearized model."""

    # state cost per coordinate: cart position, pole angles, cart velocity, pole angular velocities
    Q_CART, Q_ANGLE, Q_CART_VEL, Q_ANGLE_VEL = 1.0, 50.0, 0.1, 1.0
    R = 1.0

    def act(self, env) -> np.ndarray:
        env = env.unwrapped
        if not hasattr(self, "_K"):
            # experts are made per episode; the gain depends only on the model: solve once
            model_and_gain = _LQR_GAINS.get(id(env.model))
            if model_and_gain is None or model_and_gain[0] is not env.model:
                model_and_gain = (env.model, self._gain(env.model, env._env.frame_skip))
                _LQR_GAINS[id(env.model)] = model_and_gain
            self._K = model_and_gain[1]
            self.low, self.high = _ctrl_range(env.model)
        x = np.concatenate([env.data.qpos, env.data.qvel])
        return _clip(-self._K @ x, self.low, self.high)

    def _gain(self, model: mujoco.MjModel, frame_skip: int) -> np.ndarray:
        # mjd_transitionFD does not support the RK4 integrator these models use, so linearize the
        # whole control period (frame_skip steps with the action held) by central differences.
        nq, nv, nu = model.nq, model.nv, model.nu
        assert nq == nv, "slide/hinge joints only: x = [qpos, qvel]"
        data = mujoco.MjData(model)

        def period(x, u):
            mujoco.mj_resetData(model, data)  # upright equilibrium is x = 0, u = 0
            data.qpos[:], data.qvel[:], data.ctrl[:] = x[:nq], x[nq:], u
            for _ in range(frame_skip):
                mujoco.mj_step(model, data)
            return np.concatenate([data.qpos, data.qvel])

        eps, x0, u0 = 1e-6, np.zeros(2 * nv), np.zeros(nu)
        A = np.stack([(period(x0 + eps * e, u0) - period(x0 - eps * e, u0)) / (2 * eps)
                      for e in np.eye(2 * nv)], axis=1)
        B = np.stack([(period(x0, u0 + eps * e) - period(x0, u0 - eps * e)) / (2 * eps)
                      for e in np.eye(nu)], axis=1)
        n_poles = nv - 1
        Q = np.diag([self.Q_CART, *[self.Q_ANGLE] * n_poles, self.Q_CART_VEL, *[self.Q_ANGLE_VEL] * n_poles])
        R = self.R * np.eye(nu)
        P = scipy.linalg.solve_discrete_are(A, B, Q, R)
        return np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)


class RLExpert(GymExpert):
    """An RL-trained actor (ExpertActor) labelling the task's own observation vector deterministically."""

    def __init__(self, actor, env_id: str, seed: int | None = None, noise_std: float = 0.0):
        super().__init__(seed=seed, noise_std=noise_std)
        if actor.config["env_id"] != env_id:
            raise ValueError(f"the expert was trained on {actor.config['env_id']}, this task is {env_id}")
        self.actor = actor
        self.low, self.high = actor.low, actor.high

    def act(self, env) -> np.ndarray:
        return self.actor.act_vector(env.unwrapped.observation_vector())


def default_expert_path(task: str) -> str:
    return f"out/experts/{task}"


_ACTORS: dict = {}  # path -> ExpertActor: a worker loads the weights once, not once per episode


def load_rl_expert_actor(path: str):
    from dopr.envs.expert_actor import ExpertActor

    if path not in _ACTORS:
        _ACTORS[path] = ExpertActor.load(path)
    return _ACTORS[path]


def make_gym_expert(spec: TaskSpec, seed: int | None = None, noise_std: float = 0.0,
                    expert_path: str | None = None) -> GymExpert:
    """The expert for a gymnasium task (see the module docstring); `expert_path` for an RL-trained one."""
    if spec.extra.get("expert") == "rl":
        path = expert_path or default_expert_path(spec.name)
        try:
            actor = load_rl_expert_actor(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; task {spec.name!r} needs an RL expert: "
                                    f"`dopr expert train --task {spec.name} --out {path}`") from None
        return RLExpert(actor, spec.env_id, seed=seed, noise_std=noise_std)
    if expert_path is not None:
        raise ValueError(f"task {spec.name!r} has a scripted expert; --expert is for the RL-expert tasks")
    experts = {"reacher": ReacherExpert, "inverted_double_pendulum": PendulumLQRExpert,
               "inverted_pendulum": PendulumLQRExpert}
    if spec.name not in experts:
        raise ValueError(f"no expert for gymnasium task {spec.name!r}; known: {sorted(experts)}")
    return experts[spec.name](seed=seed, noise_std=noise_std)
