"""RL experts for the locomotion tasks: the actor file (no pickle), collection with it, and the
resumable SAC trainer killed with SIGKILL in a real process."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dopr.data import EpisodeStore
from dopr.envs import make, make_expert, task_spec
from dopr.envs.collect import CollectConfig, collect
from dopr.envs.expert_actor import ExpertActor


def random_actor(task: str, hidden=(16, 16), seed=0) -> ExpertActor:
    spec = task_spec(task)
    env = make(task)
    obs_dim = env.observation_space["observation"].shape[0]
    low, high = env.action_space.low, env.action_space.high
    env.close()
    rng = np.random.default_rng(seed)
    dims = [obs_dim, *hidden, spec.action_dim]
    weights = [(0.3 * rng.standard_normal((o, i)), 0.1 * rng.standard_normal(o)) for i, o in zip(dims, dims[1:])]
    config = dict(env_id=spec.env_id, obs_dim=obs_dim, action_dim=spec.action_dim, activation="relu",
                  squash="tanh", action_low=low.tolist(), action_high=high.tolist())
    return ExpertActor(weights, config)


def test_actor_round_trip_matches_the_formula(tmp_path):
    actor = random_actor("hopper")
    actor.save(tmp_path / "e")
    loaded = ExpertActor.load(tmp_path / "e")
    obs = np.random.default_rng(1).standard_normal((5, actor.obs_dim))
    # a = low + (tanh(W2 relu(W1 relu(W0 x + b0) + b1) + b2) + 1) / 2 * (high - low), weights stored as float32
    h = obs
    ws = [(w.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)) for w, b in actor.weights]
    for w, b in ws[:-1]:
        h = np.maximum(h @ w.T + b, 0)
    expected = actor.low + (np.tanh(h @ ws[-1][0].T + ws[-1][1]) + 1) / 2 * (actor.high - actor.low)
    np.testing.assert_allclose(loaded.act_vector(obs), expected, rtol=1e-12, atol=1e-12)
    assert np.all(loaded.act_vector(obs) <= actor.high) and np.all(loaded.act_vector(obs) >= actor.low)


def test_loading_executes_no_code(tmp_path):
    """A pickle payload in place of the weights is refused, and its code never runs."""
    import pickle

    actor = random_actor("hopper")
    actor.save(tmp_path / "e")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "e" / "actor.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(Exception):
        ExpertActor.load(tmp_path / "e")
    assert not marker.exists()


def test_load_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="expert.json"):
        ExpertActor.load(tmp_path / "nothing")
    actor = random_actor("hopper")
    actor.save(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "expert.json").read_text())
    del cfg["obs_dim"]
    (tmp_path / "e" / "expert.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"expert.json: missing keys \['obs_dim'\]"):
        ExpertActor.load(tmp_path / "e")


def test_collect_with_an_rl_expert_stores_its_deterministic_labels(tmp_path):
    actor = random_actor("hopper")
    actor.save(tmp_path / "expert")
    out = tmp_path / "hopper.zarr"
    summary = collect(CollectConfig(task="hopper", n_episodes=2, out=str(out), workers=0, horizon=30,
                                    keep_failed=True, noise_std=0.05, expert=str(tmp_path / "expert"),
                                    progress=False))
    assert summary.n_episodes == 2
    store = EpisodeStore.open(out)
    obs, action = store.array("observation")[:], store.array("action")[:]
    np.testing.assert_allclose(action, actor.act_vector(obs).astype(np.float32), rtol=1e-5, atol=1e-6)
    # the executed (noisy) action differs from the clean label, and replaying it is what happened
    assert not np.allclose(store.array("executed_action")[:], action)
    assert store.attrs["collect"]["expert"]["path"] == str(tmp_path / "expert")


def test_a_locomotion_store_trains_one_observation_to_one_action(tmp_path):
    """To, Tp, Ta default to what the store's task asks for (its TaskSpec, recorded by collect): 1, 1, 1 for
    locomotion, so `dopr experiment --tasks humanoid --policies resmlp` runs the paper's controller without
    flags; a store that records none gets the policies' 2, 16, 8, and flags override either."""
    from dopr.policies.checkpoint import load_checkpoint_meta
    from dopr.train import TrainConfig, train
    from dopr.train.config import resolve_defaults
    from tests.train_fixtures import make_store

    random_actor("hopper").save(tmp_path / "expert")
    out = tmp_path / "hopper.zarr"
    collect(CollectConfig(task="hopper", n_episodes=4, out=str(out), workers=0, horizon=30, keep_failed=True,
                          expert=str(tmp_path / "expert"), progress=False))
    run = tmp_path / "run"
    train(TrainConfig(data=str(out), out=str(run), policy="resmlp", optim="adamw", steps=4, batch_size=8,
                      threads=1, progress=False))
    assert json.loads((run / "config.json").read_text())["n_obs_steps"] == 1
    meta = load_checkpoint_meta(run / "ckpt-final")
    assert (meta["n_obs_steps"], meta["horizon"], meta["n_action_steps"]) == (1, 1, 1)

    store, synthetic = EpisodeStore.open(out), EpisodeStore.open(make_store(tmp_path / "synthetic.zarr"))
    chunks = lambda c: (c.n_obs_steps, c.horizon, c.n_action_steps)  # noqa: E731
    assert chunks(resolve_defaults(TrainConfig(data=str(out)), store)) == (1, 1, 1)
    assert chunks(resolve_defaults(TrainConfig(data="s"), synthetic)) == (2, 16, 8)
    given = TrainConfig(data=str(out), n_obs_steps=2, horizon=4, n_action_steps=2)
    assert chunks(resolve_defaults(given, store)) == (2, 4, 2)


def test_missing_rl_expert_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="dopr expert train --task walker2d"):
        make_expert("walker2d", expert_path=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="scripted expert"):
        make_expert("reacher", expert_path=str(tmp_path / "none"))


def _train_cmd(out):
    return [sys.executable, "-m", "dopr.scripts.cli", "expert", "train", "--task", "hopper", "--steps", "600",
            "--chunk-steps", "200", "--learning-starts", "100", "--buffer-size", "2000", "--eval-episodes", "1",
            "--out", str(out)]


def test_expert_training_resumes_after_sigkill_with_its_replay_buffer(tmp_path):
    pytest.importorskip("stable_baselines3", reason='needs the rl extra: pip install -e ".[rl]"')
    out = tmp_path / "hopper"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_train_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "first chunk did not finish"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(first_rows) == 1 and json.loads(first_rows[0])["env_steps"] == 200
    buffer_at_kill = np.load(out / "trainer" / "replay_observations.npy")
    assert len(buffer_at_kill) == 200

    done = subprocess.run(_train_cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [200, 400, 600]  # continued from 200, not from 0
    final = np.load(out / "trainer" / "replay_observations.npy")
    assert len(final) == 600
    np.testing.assert_array_equal(final[:200], buffer_at_kill)  # the buffer came back, not refilled
    state = json.loads((out / "trainer" / "state.json").read_text())
    assert state["replay"] == {"pos": 600, "full": False}
    # the exported expert loads without stable-baselines3's archive and acts in the action range
    actor = ExpertActor.load(out)
    assert actor.config["env_id"] == "Hopper-v5" and actor.config["env_steps"] in (200, 400, 600)
    assert (out / "returns.png").stat().st_size > 0
    action = actor.act_vector(np.zeros(actor.obs_dim))
    assert action.shape == (3,) and np.all(np.abs(action) <= 1.0)


def test_measured_expert_return_is_the_sum_of_gymnasium_rewards(tmp_path):
    """`measure_experts` reports an RL expert's return; recomputed here by stepping gymnasium's Hopper-v5
    directly with the actor's actions from the same seeds, outside dopr's env wrapper."""
    import gymnasium as gym

    from dopr.envs.measure_experts import measure_success

    actor = random_actor("hopper", seed=3)
    actor.save(tmp_path / "expert")
    result = measure_success("hopper", episodes=3, first_seed=40, progress=False, expert_path=str(tmp_path / "expert"))
    expected, lengths = [], []
    env = gym.make("Hopper-v5")
    for seed in range(40, 43):
        obs, _ = env.reset(seed=seed)
        total, steps, done = 0.0, 0, False
        while not done and steps < task_spec("hopper").horizon:
            obs, reward, terminated, truncated, _ = env.step(actor.act_vector(obs[None])[0])
            total, steps, done = total + reward, steps + 1, terminated or truncated
        expected.append(total)
        lengths.append(steps)
    env.close()
    assert result["mean_steps"] == pytest.approx(np.mean(lengths))
    np.testing.assert_allclose(result["returns"], expected, rtol=1e-5)
    assert result["mean_return"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert result["return_sd"] == pytest.approx(np.std(expected, ddof=1), rel=1e-4)


def test_expert_training_stops_at_a_goal_met_with_every_episode_surviving(tmp_path):
    """--stop-at-return: training ends at the first evaluation whose mean return reaches the goal with every
    episode at the horizon, that actor is the expert, and re-running trains nothing; an evaluation whose episodes
    fall does not stop it, however high the mean. Hopper with a 10-step time limit, so that an untrained actor
    can survive to the horizon."""
    pytest.importorskip("stable_baselines3", reason='needs the rl extra: pip install -e ".[rl]"')
    import gymnasium

    from dopr.envs.sac_trainer import SACConfig, read_metrics, train_sac_expert

    gymnasium.register("HopperTenSteps-v5", entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv",
                       max_episode_steps=10)
    gymnasium.register("HopperFalls-v5", entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv",
                       max_episode_steps=400, kwargs=dict(healthy_z_range=(0.7, 1.0)))  # falls at once
    tiny = dict(steps=600, chunk_steps=200, learning_starts=100, buffer_size=1000, eval_episodes=2)

    out = tmp_path / "short"
    last = train_sac_expert(SACConfig(env_id="HopperTenSteps-v5", stop_at_return=-1e9, **tiny), out, progress=False)
    rows = read_metrics(out)
    assert [r["env_steps"] for r in rows] == [200] and rows[0]["eval_survived"] == 2
    assert last == rows[0] and ExpertActor.load(out).config["env_steps"] == 200
    again = train_sac_expert(SACConfig(env_id="HopperTenSteps-v5", stop_at_return=-1e9, **tiny), out, progress=False)
    assert again == rows[0] and len(read_metrics(out)) == 1  # the goal was met: nothing more trained
    # the same run resumed without the goal trains on to its steps
    train_sac_expert(SACConfig(env_id="HopperTenSteps-v5", **tiny), out, progress=False)
    assert [r["env_steps"] for r in read_metrics(out)] == [200, 400, 600]

    out = tmp_path / "falls"
    train_sac_expert(SACConfig(env_id="HopperFalls-v5", stop_at_return=-1e9, **{**tiny, "steps": 400}), out,
                     progress=False)
    rows = read_metrics(out)
    assert [r["env_steps"] for r in rows] == [200, 400] and all(r["eval_survived"] == 0 for r in rows)
