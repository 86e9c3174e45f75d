"""robosuite tasks, the task registry and the scripted experts, on the real simulator."""

import os
import subprocess
import sys

import numpy as np
import pytest

import dopr.envs
from dopr.envs import list_tasks, make, make_expert, task_spec
from dopr.envs.measure_experts import measure_success, run_episode
from dopr.envs.rendering import offscreen_rendering_error

ROBOSUITE_TASKS = ["lift", "can", "square", "stack", "nut_assembly"]


@pytest.fixture(scope="module")
def lift():
    env = make("lift")
    yield env
    env.close()


def test_registry_names_horizons_and_unknown_task():
    assert set(ROBOSUITE_TASKS) <= set(list_tasks())
    horizons = {name: task_spec(name).horizon for name in ROBOSUITE_TASKS}
    assert horizons == {"lift": 400, "can": 400, "square": 400, "stack": 400,
                        "nut_assembly": 700}
    for name in ROBOSUITE_TASKS:
        spec = task_spec(name)
        assert spec.kind == "robosuite" and spec.action_dim == 7 and spec.control_freq == 20
    with pytest.raises(KeyError, match="unknown task 'lfit'.*lift"):
        task_spec("lfit")
    with pytest.raises(ValueError, match="obs must be"):
        make("lift", obs="depth")


def test_spaces_step_and_horizon(lift):
    env = make("lift", horizon=3)
    obs, info = env.reset(seed=0)
    assert set(obs) == {"robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"}
    assert obs["object"].shape == (10,) and obs["robot0_eef_quat"].shape == (4,)
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (7,)
    assert info == {"success": False}
    truncated = []
    for _ in range(3):
        obs, reward, terminated, trunc, info = env.step(np.zeros(7))
        assert isinstance(info["success"], bool) and not terminated
        truncated.append(trunc)
    assert truncated == [False, False, True]
    with pytest.raises(ValueError, match=r"action has shape \(6,\)"):
        env.step(np.zeros(6))
    env.close()


def test_same_seed_same_initial_state_across_instances(lift):
    lift.reset(seed=3)
    first = lift.get_state()
    lift.reset(seed=4)
    other = lift.get_state()
    lift.reset(seed=3)
    again = lift.get_state()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3  # placement and joint noise differ
    # a fresh instance (another worker) gives the same start, and honours the constructor seed
    fresh = make("lift", seed=3)
    fresh.reset()
    np.testing.assert_array_equal(fresh.get_state(), first)
    fresh.close()


def test_same_seed_with_composite_placement_sampler():
    # NutAssembly draws from a SequentialCompositeSampler: every generator must be reseeded
    env = make("nut_assembly")
    obs, _ = env.reset(seed=11)
    a = env.get_state()
    env.reset(seed=12)
    env.reset(seed=11)
    np.testing.assert_array_equal(env.get_state(), a)
    # the observation of a restored state is the one of the original (robosuite's relative
    # object-to-gripper observables read a cache that lags a state jump by one pass)
    assert np.abs(obs["object"][:3]).max() > 0.01
    restored = env.reset_to_state(a)
    for key in obs:
        np.testing.assert_allclose(restored[key], obs[key], atol=1e-9, err_msg=key)
    env.close()


def test_reset_is_fast(lift):
    import time

    start = time.perf_counter()
    for seed in range(10):
        lift.reset(seed=seed)
    per_reset = (time.perf_counter() - start) / 10
    assert per_reset < 0.25, f"reset took {per_reset:.3f} s: hard_reset should be off"


def test_replay_from_first_state_reproduces_episode(lift):
    """What the collector stores (first state + actions) replays to the same end, in another env."""
    expert = make_expert("lift", seed=0, noise_std=0.1)
    episode = run_episode(lift, expert, seed=5)
    assert episode["success"]
    replay = make("lift")
    replay.reset(seed=99)  # a different episode first: nothing of it may leak into the replay
    obs = replay.reset_to_state(episode["states"][0])
    assert set(obs) == set(lift.observation_space.spaces)
    success = False
    for action in episode["actions"]:
        _, _, _, _, info = replay.step(action)
        success = success or info["success"]
    assert success
    np.testing.assert_allclose(replay.get_state(), episode["states"][-1], atol=1e-5)
    with pytest.raises(ValueError, match=r"lift: state has shape \(5,\)"):
        replay.reset_to_state(np.zeros(5))
    replay.close()


def test_expert_is_a_feedback_policy(lift):
    """The label depends on the state only: same state, same label, whatever came before."""
    expert = make_expert("lift")
    episode = run_episode(lift, expert, seed=8)
    mid = episode["states"][len(episode["states"]) // 2]
    lift.reset_to_state(mid)
    a1 = expert.act(lift)
    lift.reset(seed=1)
    for _ in range(5):
        lift.step(expert.act(lift))
    lift.reset_to_state(mid)
    np.testing.assert_array_equal(expert.act(lift), a1)
    # and it labels states it did not produce: start a fresh expert from the middle state
    fresh = make_expert("lift")
    success = False
    for _ in range(100):
        _, _, _, _, info = lift.step(fresh.act(lift))
        if info["success"]:
            success = True
            break
    assert success


def test_expert_noise_is_seeded_and_on_positions_only(lift):
    lift.reset(seed=0)
    label = make_expert("lift").act(lift)
    a = make_expert("lift", seed=1, noise_std=0.2)
    b = make_expert("lift", seed=1, noise_std=0.2)
    noisy_a, noisy_b = a.noisy(label), b.noisy(label)
    np.testing.assert_array_equal(noisy_a, noisy_b)
    assert np.abs(noisy_a[:3] - label[:3]).max() > 0
    np.testing.assert_array_equal(noisy_a[3:], label[3:])
    assert np.all(np.abs(noisy_a) <= 1.0)
    assert make_expert("lift").noisy(label) is label  # no noise: the label itself


@pytest.mark.parametrize("task,episodes", [("lift", 3), ("can", 3), ("square", 3), ("stack", 3),
                                           ("nut_assembly", 2)])
def test_expert_succeeds_on_seeded_episodes(task, episodes):
    # the first episodes of the 100-episode protocol (seeds 0, 1, ...), see the slow test below
    result = measure_success(task, episodes=episodes, first_seed=0, progress=False)
    assert result["successes"] == episodes, result


def test_nut_assembly_expert_on_seeds_that_wound_up_the_wrist():
    # Before the nut grasp yaw took the carry's turn into account, the first nut left the wrist
    # at its limit: on seed 14 a finger then landed on the round nut's ring, on seed 40 the arm
    # straightened at the far peg and OSC could not leave that pose.
    for seed in (14, 40):
        result = measure_success("nut_assembly", episodes=1, first_seed=seed, progress=False)
        assert result["successes"] == 1, result


def test_expert_succeeds_with_action_noise():
    result = measure_success("lift", episodes=3, first_seed=2000, noise_std=0.1, progress=False)
    assert result["successes"] == 3, result


@pytest.mark.slow
@pytest.mark.parametrize("task", ROBOSUITE_TASKS)
def test_expert_success_rate_over_100_episodes(task):
    result = measure_success(task, episodes=100, first_seed=0, progress=False)
    assert result["success_rate"] >= 0.95, result


def test_image_observations():
    reason = offscreen_rendering_error()
    if reason is not None:
        pytest.skip(reason)
    env = make("lift", obs="image", image_size=32)
    obs, _ = env.reset(seed=0)
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        assert obs[key].dtype == np.uint8 and obs[key].shape == (32, 32, 3)
        assert obs[key].std() > 1.0  # a real picture, not a blank buffer
    assert env.observation_space.contains(obs)
    assert "robot0_eef_pos" in obs  # image tasks keep the low-dim keys
    env.close()


def _run_python(code: str, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_vars)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.skipif(bool(os.environ.get("DISPLAY")), reason="GLFW works with a display")
def test_clear_error_when_rendering_is_unavailable():
    # GLFW needs a display: on a headless machine image tasks must say what to do, while
    # low-dim tasks, which render nothing, still work.
    code = (
        "import dopr.envs\n"
        "env = dopr.envs.make('lift'); env.reset(seed=0)\n"
        "try:\n"
        "    dopr.envs.make('lift', obs='image')\n"
        "except RuntimeError as err:  # what a caller that knows no dopr error type catches\n"
        "    print('ERROR:', type(err).__name__, err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "PYOPENGL_PLATFORM")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, MUJOCO_GL="glfw"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR: RenderingUnavailable" in out.stdout and "apt-get install -y libosmesa6" in out.stdout
    assert "MUJOCO_GL=osmesa" in out.stdout


def test_robosuite_import_noise_is_silenced():
    out = _run_python("import dopr.envs; dopr.envs.make('lift').reset(seed=0)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[robosuite WARNING]" not in out.stderr + out.stdout
    assert "[robosuite INFO]" not in out.stderr + out.stdout


def test_package_exports():
    spec = dopr.envs.task_spec("lift")
    assert isinstance(spec, dopr.envs.TaskSpec) and spec.name == "lift" and "lift" in dopr.envs.list_tasks()
    assert dopr.envs.make is dopr.envs.tasks.make and callable(dopr.envs.make_expert("lift").act)
