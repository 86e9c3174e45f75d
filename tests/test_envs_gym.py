"""gymnasium MuJoCo tasks: seeding, state round trip, success checks and the controller experts."""

import numpy as np
import pytest

from dopr.envs.gym_env import GYM_TASKS, REACH_HOLD_STEPS, make_gym_env
from dopr.envs.gym_experts import make_gym_expert


def run(env, expert, seed=None, start_state=None, max_steps=None):
    """Expert episode from reset(seed) or from start_state; stops at success/termination."""
    if start_state is None:
        env.reset(seed=seed)
    else:
        env.reset_to_state(start_state)
    expert.reset()
    info, terminated, steps = {"success": False}, False, 0
    for _ in range(max_steps or env.horizon):
        _, _, terminated, truncated, info = env.step(expert.noisy(expert.act(env)))
        steps += 1
        if info["success"] or terminated or truncated:
            break
    return info["success"], terminated, steps


@pytest.mark.parametrize("task,seeds", [("reacher", range(5)), ("inverted_double_pendulum", range(2)),
                                         ("inverted_pendulum", range(2))])
def test_expert_succeeds_on_seeded_episodes(task, seeds):
    env = make_gym_env(GYM_TASKS[task])
    for seed in seeds:
        expert = make_gym_expert(GYM_TASKS[task], seed=seed)
        assert run(env, expert, seed)[0], f"{task} expert failed on seed {seed}"


@pytest.mark.parametrize("task", sorted(GYM_TASKS))
def test_same_seed_same_initial_state_and_dict_obs(task):
    spec = GYM_TASKS[task]
    env = make_gym_env(spec, seed=7)
    obs, info = env.reset()  # the constructor's seed seeds the first reset
    s7 = env.get_state()
    assert set(obs) == set(spec.lowdim_keys) and info["success"] is False
    assert obs["observation"].shape == env.observation_space["observation"].shape
    env.reset(seed=8)
    assert not np.array_equal(env.get_state(), s7)
    env.reset(seed=7)
    np.testing.assert_array_equal(env.get_state(), s7)
    other = make_gym_env(spec)
    other.reset(seed=7)
    np.testing.assert_array_equal(other.get_state(), s7)


@pytest.mark.parametrize("task", sorted(GYM_TASKS))
def test_reset_to_state_reproduces_a_rollout_exactly(task):
    spec = GYM_TASKS[task]
    env = make_gym_env(spec)
    rng = np.random.default_rng(0)
    env.reset(seed=3)
    for _ in range(5):  # leave the initial state: velocities and warm start are non-trivial
        env.step(rng.uniform(-1, 1, spec.action_dim))
    start = env.get_state()
    actions = rng.uniform(-1, 1, (20, spec.action_dim))
    first = [env.step(a)[0]["observation"] for a in actions]
    end = env.get_state()
    env.reset(seed=99)
    obs = env.reset_to_state(start)
    assert set(obs) == set(spec.lowdim_keys)
    second = [env.step(a)[0]["observation"] for a in actions]
    np.testing.assert_array_equal(np.array(first), np.array(second))
    np.testing.assert_array_equal(env.get_state(), end)
    with pytest.raises(ValueError, match="expected"):
        env.reset_to_state(start[:-1])


def test_success_checks_fail_without_the_expert():
    # reacher: doing nothing never reaches the target
    env = make_gym_env(GYM_TASKS["reacher"])
    env.reset(seed=0)
    for _ in range(env.horizon):
        _, _, terminated, truncated, info = env.step(np.zeros(2))
        assert not info["success"]
    assert truncated and not terminated
    # pendulums: with no control the poles fall, the episode terminates and is not a success
    for task in ("inverted_double_pendulum", "inverted_pendulum"):
        env = make_gym_env(GYM_TASKS[task])
        env.reset(seed=0)
        for t in range(env.horizon):
            _, _, terminated, _, info = env.step(np.zeros(1))
            assert not info["success"]
            if terminated:
                break
        assert terminated and t < 100, task


def test_reacher_success_needs_the_hold():
    env = make_gym_env(GYM_TASKS["reacher"])
    expert = make_gym_expert(GYM_TASKS["reacher"])
    env.reset(seed=1)
    model, data = env.model, env.data
    tip, target = model.body("fingertip").id, model.body("target").id
    close_steps = 0
    for _ in range(env.horizon):
        _, _, _, _, info = env.step(expert.act(env))
        close = np.linalg.norm(data.xpos[tip, :2] - data.xpos[target, :2]) < 0.02
        close_steps = close_steps + 1 if close else 0
        assert info["success"] == (close_steps >= REACH_HOLD_STEPS)
        if info["success"]:
            break
    assert info["success"]


def test_pendulum_success_only_at_the_horizon():
    env = make_gym_env(GYM_TASKS["inverted_double_pendulum"], horizon=30)
    expert = make_gym_expert(GYM_TASKS["inverted_double_pendulum"])
    env.reset(seed=0)
    for t in range(1, 31):
        _, _, terminated, truncated, info = env.step(expert.act(env))
        assert not terminated
        assert info["success"] == (t == 30) == truncated


def test_experts_label_perturbed_states():
    """A feedback expert recovers from states its own rollouts never visit."""
    rng = np.random.default_rng(0)
    spec = GYM_TASKS["inverted_double_pendulum"]
    env = make_gym_env(spec, horizon=200)
    env.reset(seed=0)
    env.data.qpos[:] = [0.3, 0.12, -0.1]  # cart off-centre, poles leaning
    env.data.qvel[:] = [0.5, -0.5, 0.5]
    state = env.get_state()
    assert run(env, make_gym_expert(spec), start_state=state)[0]
    spec = GYM_TASKS["reacher"]
    env = make_gym_env(spec)
    for seed in range(3):
        env.reset(seed=seed)
        env.data.qpos[:2] = rng.uniform(-3, 3, 2)
        env.data.qvel[:2] = rng.uniform(-5, 5, 2)
        assert run(env, make_gym_expert(spec), start_state=env.get_state())[0]


def test_noisy_expert_is_seeded_and_keeps_clean_labels():
    spec = GYM_TASKS["reacher"]
    env = make_gym_env(spec)
    env.reset(seed=0)
    a = make_gym_expert(spec, seed=5, noise_std=0.1)
    b = make_gym_expert(spec, seed=5, noise_std=0.1)
    label = a.act(env)
    np.testing.assert_array_equal(label, make_gym_expert(spec).act(env))  # noise never in the label
    noisy_a, noisy_b = a.noisy(label), b.noisy(b.act(env))
    np.testing.assert_array_equal(noisy_a, noisy_b)
    assert 0 < np.abs(noisy_a - label).max() < 1.0
    assert np.all(noisy_a <= 1.0) and np.all(noisy_a >= -1.0)
    for seed in range(3):
        assert run(env, make_gym_expert(spec, seed=seed, noise_std=0.1), seed)[0]


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="obs must be"):
        make_gym_env(GYM_TASKS["reacher"], obs="rgb")


def test_image_observations():
    from dopr.envs.rendering import offscreen_rendering_error

    error = offscreen_rendering_error()
    if error:
        pytest.skip(error)
    env = make_gym_env(GYM_TASKS["reacher"], obs="image", image_size=32)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (32, 32, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 0  # a real render, not a blank frame
    assert env.observation_space["image"].shape == (32, 32, 3)
    first = obs["image"].copy()
    for _ in range(10):
        obs, *_ = env.step(np.ones(2))
    assert not np.array_equal(first, obs["image"])  # the arm moved
