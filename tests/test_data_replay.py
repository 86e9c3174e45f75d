"""check-replay: stored actions replayed from the stored first state reproduce the stored success,
in the real simulator, and a store whose actions were changed is caught."""

import numpy as np
import pytest

from dopr.data import EpisodeStore
from dopr.envs.replay import check_replay
from dopr.scripts.cli import main as dopr

envs = pytest.importorskip("dopr.envs")


def record_expert_episodes(path, task: str, seeds, noise_std: float = 0.0):
    """Roll out the task's expert and store what `dopr collect` stores (obs, state before the
    action, clean action label, executed action when noisy), written here through the envs
    contract so that this test does not depend on the collector."""
    env = envs.make(task)
    store = EpisodeStore.create(path, attrs={"task": task, "env_meta": {"horizon": env.spec.max_episode_steps
                                                                        if env.spec else None}})
    rng = np.random.default_rng(0)
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        expert = envs.make_expert(task, seed=seed)
        expert.reset()
        steps = {"state": [], "action": [], "executed_action": [], "success": []}
        for _ in range(envs.task_spec(task).horizon):
            steps["state"].append(env.get_state())
            label = np.asarray(expert.act(env), dtype=np.float32)
            executed = label + (rng.normal(0, noise_std, label.shape).astype(np.float32) if noise_std else 0)
            steps["action"].append(label)
            steps["executed_action"].append(executed)
            obs, _, terminated, truncated, info = env.step(executed)
            steps["success"].append(bool(info["success"]))
            if info["success"] or terminated or truncated:
                break
        store.append_episode({k: np.stack(v) for k, v in steps.items()})
    env.close()
    return store


def test_replay_reproduces_success_and_catches_changed_actions(tmp_path):
    store = record_expert_episodes(tmp_path / "reacher.zarr", "reacher", seeds=[0, 1, 2], noise_std=0.05)
    assert all(bool(store.get_episode(i)["success"].any()) for i in range(3))
    results = check_replay(store, lambda: envs.make("reacher"), progress=False)
    assert [r.ok for r in results] == [True, True, True]
    assert all(r.replay_success and r.max_state_error < 1e-9 for r in results)
    assert dopr(["data", "check-replay", str(store.path)]) == 0

    # replaying the clean labels instead of the executed (noisy) actions drifts away from the states
    clean = check_replay(store, lambda: envs.make("reacher"), progress=False, action_key="action")
    assert max(r.max_state_error for r in clean) > 1e-6

    # zeroed actions: the arm does not reach the target, and the check fails
    writable = EpisodeStore.open(store.path, mode="a")
    writable.array("executed_action")[: writable.episode_ends[0]] = 0.0
    results = check_replay(writable, lambda: envs.make("reacher"), progress=False)
    assert [r.ok for r in results] == [False, True, True]
    assert dopr(["data", "check-replay", str(store.path), "--episodes", "1"]) == 1


def test_replay_robosuite_lift_reproduces_success(tmp_path):
    store = record_expert_episodes(tmp_path / "lift.zarr", "lift", seeds=[0, 1], noise_std=0.05)
    results = check_replay(store, lambda: envs.make("lift"), progress=False)
    assert [(r.stored_success, r.replay_success) for r in results] == [(True, True), (True, True)]
