"""The task registry: every task dopr knows, by name, robosuite and gymnasium alike.

    env = dopr.envs.make("lift", seed=0)            # gymnasium.Env, dict observations
    spec = dopr.envs.task_spec("lift")              # horizon, keys, action_dim, ...
    dopr.envs.primary_metric("hopper")              # "return" (locomotion) or "success"
    expert = dopr.envs.make_expert("lift", seed=0)  # feedback policy: expert.act(env) -> action
"""

from __future__ import annotations

from dopr.envs.gym_env import GYM_TASKS, make_gym_env
from dopr.envs.gym_experts import make_gym_expert
from dopr.envs.robosuite_env import ROBOSUITE_TASKS, make_robosuite_env
from dopr.envs.robosuite_experts import make_robosuite_expert
from dopr.envs.task_spec import TaskSpec

TASKS: dict[str, TaskSpec] = {**ROBOSUITE_TASKS, **GYM_TASKS}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return TASKS[name]


def primary_metric(name: str | None) -> str:
    """What a task's runs are compared by: "return" for the locomotion tasks (where success only means surviving
    to the horizon), else "success". A task dopr does not know (or None) counts as a success task."""
    spec = TASKS.get(name) if name else None
    return spec.extra.get("metric", "success") if spec is not None else "success"


def make(name: str, seed: int | None = None, obs: str = "lowdim", horizon: int | None = None,
         image_size: int = 84, **kw):
    """Build task `name` as a gymnasium.Env; `seed` fixes the first reset's initial state.

    obs="lowdim" gives the spec's lowdim_keys; obs="image" adds its image_keys (uint8 HxWx3),
    which needs offscreen rendering (dopr.envs.rendering). `horizon` overrides the spec's.
    Extra keywords go to the simulator wrapper (e.g. hard_reset, model_seed for robosuite).
    """
    spec = task_spec(name)
    if spec.kind == "robosuite":
        return make_robosuite_env(spec, seed=seed, obs=obs, horizon=horizon,
                                  image_size=image_size, **kw)
    return make_gym_env(spec, seed=seed, obs=obs, horizon=horizon, image_size=image_size, **kw)


def make_expert(name: str, seed: int | None = None, noise_std: float = 0.0, expert_path: str | None = None):
    """The expert of task `name`: `reset()`, `act(env)`, `noisy(action)`.

    Scripted or controller experts for most tasks; for the locomotion tasks an RL-trained actor read
    from `expert_path` (default out/experts/<name>, written by `dopr expert train`).
    """
    spec = task_spec(name)
    if spec.kind == "robosuite":
        if expert_path is not None:
            raise ValueError(f"task {name!r} has a scripted expert; --expert is for the RL-expert tasks")
        return make_robosuite_expert(spec, seed=seed, noise_std=noise_std)
    return make_gym_expert(spec, seed=seed, noise_std=noise_std, expert_path=expert_path)
