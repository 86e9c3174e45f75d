"""Closed-loop evaluator: metrics against hand-computed values, repeatability, faults, files on disk.

Everything runs the real simulator (gymnasium Reacher-v5 through dopr.envs) in real spawned worker
processes, with real checkpoints written by dopr.policies.save_checkpoint.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import torch

from dopr.eval.config import EvalConfig
from dopr.eval.metrics import spearman, success_stats, wilson_interval

TASK = "reacher"
HORIZON = 30  # control steps; short episodes keep the suite fast


# ---------------------------------------------------------------------------------------------
# metrics


def test_wilson_interval_matches_hand_computed_values():
    # 8/10: p=0.8, z=1.959964, z^2/n = 0.384146; centre = (0.8 + 0.192073) / 1.384146 = 0.716733,
    # half width = 1.959964 * sqrt(0.016 + 0.009604) / 1.384146 = 0.226583
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490155, abs=1e-5)
    assert hi == pytest.approx(0.943318, abs=1e-5)
    # 0/10: the lower bound is exactly 0, upper z^2/(n+z^2) = 3.841459/13.841459
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / 13.841459, abs=1e-6)
    # the interval is not symmetric around p (unlike the normal approximation)
    lo, hi = wilson_interval(1, 50)
    assert lo > 0 and (0.02 - lo) < (hi - 0.02)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_success_stats_of_episode_records():
    episodes = [
        {"success": True, "steps": 10, "return": 1.0, "time_to_success": 10},
        {"success": False, "steps": 30, "return": -2.0, "time_to_success": None},
        {"success": True, "steps": 20, "return": 0.5, "time_to_success": 20},
        {"success": False, "steps": 4, "return": 0.0, "time_to_success": None, "error": "worker died"},
    ]
    s = success_stats(episodes)
    assert (s.n_episodes, s.n_success, s.n_errors) == (4, 2, 1)
    assert s.success_rate == 0.5
    assert s.mean_return == pytest.approx(-0.125)
    # returns 1, -2, 0.5, 0: squared deviations from -0.125 sum to 5.1875; t_0.975 at 3 degrees of freedom is 3.182
    half = 3.182446 * math.sqrt(5.1875 / 3) / 2
    assert (s.return_ci_low, s.return_ci_high) == pytest.approx((-0.125 - half, -0.125 + half), rel=1e-6)
    assert s.mean_length == pytest.approx(16.0)
    assert s.time_to_success == pytest.approx(15.0)  # over the successful episodes only
    assert (s.ci_low, s.ci_high) == wilson_interval(2, 4)


def test_spearman_matches_hand_computed_values():
    # ranks of y with a tie: [1, 2, 3.5, 5, 3.5]; deviations from 3: x [-2,-1,0,1,2], y [-2,-1,.5,2,.5]
    # rho = 8 / sqrt(10 * 9.5)
    rho, p, n = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert rho == pytest.approx(8 / math.sqrt(95), abs=1e-12) and n == 5 and 0 < p < 1
    rho, _, _ = spearman([0.1, 0.2, 0.3, 0.4], [0.9, 0.7, 0.5, 0.1])  # monotone decreasing
    assert rho == pytest.approx(-1.0)
    rho, _, n = spearman([1, 2, float("nan"), 4], [1, 1, 1, 1])  # constant side: no ranking
    assert math.isnan(rho) and n == 3


# ---------------------------------------------------------------------------------------------
# real checkpoints, real workers


def _save_checkpoint(path, task=TASK, obs_dim=None, seed=0, meta_task=None, **extra_meta):
    """A freshly initialized MLP policy written with the real checkpoint code."""
    from dopr.envs import make, task_spec
    from dopr.policies import MLPPolicy, PolicyConfig, save_checkpoint

    spec = task_spec(task)
    if obs_dim is None:
        obs, _ = make(task).reset(seed=0)
        obs_dim = obs["observation"].shape[0]
    cfg = PolicyConfig(kind="mlp", obs_shapes={"observation": [obs_dim]}, action_dim=spec.action_dim,
                       n_obs_steps=2, horizon=8, n_action_steps=4, mlp_hidden_dim=32, mlp_layers=2)
    torch.manual_seed(seed)
    policy = MLPPolicy(cfg)
    meta = {"task": meta_task or task, "step": 100, "val_loss": 0.5, "obs_shapes": cfg.obs_shapes, **extra_meta}
    return str(save_checkpoint(path, policy, meta=meta))


class _KillingPolicy(torch.nn.Module):
    """Test wrapper around a real policy: on its k-th call it sends `sig` to a real worker process."""

    def __init__(self, policy, at_call: int, sig: int, worker_name: str | None = "dopr-eval-worker-0"):
        super().__init__()
        self.policy, self.config = policy, policy.config
        self.at_call, self.sig, self.worker_name, self.calls = at_call, sig, worker_name, 0
        self.killed_pid = None

    def reset(self):
        self.policy.reset()

    def predict_action(self, obs, generator=None):
        self.calls += 1
        if self.calls == self.at_call:
            if self.worker_name is None:  # Ctrl-C in the main process
                os.kill(os.getpid(), self.sig)
            else:
                self.killed_pid = self.worker_pid()
                os.kill(self.killed_pid, self.sig)
        return self.policy.predict_action(obs, generator=generator)

    def worker_pid(self) -> int:
        (proc,) = [p for p in mp.active_children() if p.name == self.worker_name]
        return proc.pid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    return _save_checkpoint(tmp_path_factory.mktemp("run") / "ckpt-0000100")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """4 episodes with one worker: the results every other configuration must reproduce."""
    from dopr.eval import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, EvalConfig(episodes=4, workers=1, horizon=HORIZON, progress=False))


def _fingerprint(records):
    return [(r["episode"], r["seed"], r["success"], r["steps"], r["return"], r["time_to_success"]) for r in records]


def test_results_files_record_protocol_and_episodes(checkpoint, reference):
    out = os.path.join(checkpoint, "eval")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["n_episodes"] == 4 and saved["task"] == TASK and not saved["interrupted"]
    proto = saved["protocol"]
    assert proto["checkpoint"] == os.path.abspath(checkpoint)
    assert proto["seeds"] == [100000, 100003] and proto["horizon"] == HORIZON and proto["init"] == "random"
    assert proto["versions"]["mujoco"] and proto["versions"]["torch"]
    with open(os.path.join(out, "episodes.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [e["seed"] for e in lines] == [100000, 100001, 100002, 100003]
    assert all(e["steps"] == HORIZON and e["error"] is None for e in lines)  # a random policy never succeeds
    assert saved["success_rate"] == reference.success_rate == 0.0
    assert saved["mean_return"] == pytest.approx(np.mean([e["return"] for e in lines]))
    # its 95% t interval, and the printed summary says it
    half = 3.182446 * np.std([e["return"] for e in lines], ddof=1) / 2
    assert (saved["return_ci_low"], saved["return_ci_high"]) == pytest.approx(
        (saved["mean_return"] - half, saved["mean_return"] + half), rel=1e-6)
    assert (f"mean return {reference.mean_return:.3f} (95% t CI {reference.return_ci_low:.3f} to "
            f"{reference.return_ci_high:.3f})") in reference.describe()
    # different seeds give different episodes (the initial states really come from the seeds)
    assert len({e["return"] for e in lines}) == 4


def test_same_seeds_same_results_regardless_of_worker_count(checkpoint, reference, tmp_path):
    from dopr.eval import evaluate_checkpoint

    again = evaluate_checkpoint(checkpoint, EvalConfig(episodes=4, workers=2, horizon=HORIZON, progress=False),
                                out_dir=str(tmp_path))
    assert _fingerprint(again.episodes) == _fingerprint(reference.episodes)
    shifted = evaluate_checkpoint(checkpoint, EvalConfig(episodes=2, horizon=HORIZON, seed_base=7, progress=False),
                                  out_dir=str(tmp_path / "other"))
    assert [e["return"] for e in shifted.episodes] != [e["return"] for e in reference.episodes[:2]]


class _NoiseDrawingPolicy(torch.nn.Module):
    """A real deterministic policy that also draws from the evaluator's noise generator, as a diffusion
    or flow policy does: the evaluator must then step all episodes in lockstep, so the order of the
    draws, and with it every episode, does not depend on which worker answers first."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.config = policy, policy.config

    def reset(self):
        self.policy.reset()

    def predict_action(self, obs, generator=None):
        torch.randn(1, generator=generator)
        return self.policy.predict_action(obs, generator=generator)


def test_policies_that_draw_noise_are_stepped_in_lockstep(checkpoint, reference, tmp_path):
    from dopr.eval import evaluate_policy
    from dopr.policies import load_policy

    result = evaluate_policy(_NoiseDrawingPolicy(load_policy(checkpoint)), TASK,
                             EvalConfig(episodes=4, workers=2, horizon=HORIZON, progress=False), out_dir=str(tmp_path))
    assert result.timing["schedule"] == "lockstep"
    assert reference.timing["schedule"] == "pipelined"
    assert _fingerprint(result.episodes) == _fingerprint(reference.episodes)


def test_killed_worker_is_recorded_and_evaluation_goes_on(checkpoint, reference, tmp_path):
    from dopr.eval import evaluate_policy
    from dopr.policies import load_policy

    # 2 workers: worker 0 runs episode 0 first; kill it (SIGKILL, a real process) at the 3rd control round.
    # Lockstep (the policy draws noise), so every worker has answered two rounds by then and the killed
    # episode has steps to record; pipelined, worker 1 could take rounds 2 and 3 alone under load.
    policy = _KillingPolicy(_NoiseDrawingPolicy(load_policy(checkpoint)), at_call=3, sig=signal.SIGKILL)
    result = evaluate_policy(policy, TASK, EvalConfig(episodes=4, workers=2, horizon=HORIZON, progress=False),
                             out_dir=str(tmp_path))
    assert policy.killed_pid is not None
    assert result.n_episodes == 4 and result.n_errors == 1 and result.timing["worker_restarts"] == 1
    (failed,) = [e for e in result.episodes if e["error"]]
    assert failed["episode"] == 0 and not failed["success"]
    assert f"pid {policy.killed_pid}" in failed["error"] and "died" in failed["error"]
    assert 0 < failed["steps"] < HORIZON
    # every other episode, including those the restarted worker ran, is exactly the fault-free one
    ok = [e for e in result.episodes if not e["error"]]
    assert _fingerprint(ok) == _fingerprint(reference.episodes[1:])
    with open(tmp_path / "episodes.jsonl") as f:
        assert len(f.readlines()) == 4


def test_hung_worker_times_out_and_is_restarted(checkpoint, reference, tmp_path):
    from dopr.eval import evaluate_policy
    from dopr.policies import load_policy

    # SIGSTOP freezes the worker: it neither answers nor dies, as a simulator stuck in a loop
    policy = _KillingPolicy(load_policy(checkpoint), at_call=2, sig=signal.SIGSTOP)
    cfg = EvalConfig(episodes=3, workers=1, horizon=HORIZON, episode_timeout_s=5.0, progress=False)
    result = evaluate_policy(policy, TASK, cfg, out_dir=str(tmp_path))
    assert result.n_errors == 1 and "timed out" in result.episodes[0]["error"]
    assert _fingerprint(result.episodes[1:]) == _fingerprint(reference.episodes[1:3])


def test_ctrl_c_keeps_finished_episodes(checkpoint, tmp_path):
    from dopr.eval import evaluate_policy
    from dopr.eval.results import read_episodes
    from dopr.policies import load_policy

    # one worker, 8 control rounds per episode (30 steps / 4): SIGINT during the third episode
    policy = _KillingPolicy(load_policy(checkpoint), at_call=20, sig=signal.SIGINT, worker_name=None)
    with pytest.raises(KeyboardInterrupt):
        evaluate_policy(policy, TASK, EvalConfig(episodes=5, horizon=HORIZON, progress=False), out_dir=str(tmp_path))
    kept = read_episodes(str(tmp_path / "episodes.jsonl"))
    assert [e["episode"] for e in kept] == [0, 1]
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["interrupted"] and saved["n_episodes"] == 2
    assert not [p for p in mp.active_children() if p.name.startswith("dopr-eval-worker")]


def test_policy_with_nonfinite_actions_is_a_fault_not_failed_episodes(tmp_path):
    """A real checkpoint with one NaN weight: `dopr eval` stops with one line saying the policy output NaN
    actions (never 0 successes from a simulator driven with NaN), exit status 2, and writes no results.json."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    ckpt = _save_checkpoint(tmp_path / "ckpt-nan")
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(os.path.join(ckpt, name))
        first = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 2)
        weights[first][0, 0] = float("nan")
        save_file(weights, os.path.join(ckpt, name))
    res = subprocess.run([sys.executable, "-m", "dopr", "eval", "--checkpoint", ckpt, "--episodes", "3",
                          "--workers", "1", "--horizon", str(HORIZON), "--quiet"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        f"dopr eval: error: {os.path.join(ckpt, 'meta.json')}: the policy output NaN or inf actions for episode 0 "
        "(seed 100000) at step 0: its weights or normalizer hold NaN/inf, or it diverged on this observation. The "
        "evaluation stopped and recorded no success rate; the 0 episode(s) finished before are in episodes.jsonl"]
    # results.json is written when an evaluation starts, marked incomplete: it must stay so, with no success rate
    # that a report or `dopr experiment` could take for a result
    result = json.load(open(os.path.join(ckpt, "eval", "results.json")))
    assert result["complete"] is False and result["n_episodes"] == 0


def test_checkpoint_of_another_task_or_schema_is_refused(tmp_path):
    from dopr.eval import CheckpointMismatch, evaluate_checkpoint

    ckpt = _save_checkpoint(tmp_path / "ckpt-a")
    with pytest.raises(CheckpointMismatch, match="reacher"):
        evaluate_checkpoint(ckpt, EvalConfig(episodes=1, progress=False), task="inverted_double_pendulum")
    # recorded task inverted_double_pendulum (action_dim 1), but the policy's action size is reacher's
    wrong = _save_checkpoint(tmp_path / "ckpt-b", meta_task="inverted_double_pendulum", obs_dim=10)
    with pytest.raises(CheckpointMismatch, match="action_dim"):
        evaluate_checkpoint(wrong, EvalConfig(episodes=1, progress=False))
    # trained at another control rate (reacher runs at 50 Hz)
    slow = _save_checkpoint(tmp_path / "ckpt-d", control_freq=20.0)
    with pytest.raises(CheckpointMismatch, match="control_freq"):
        evaluate_checkpoint(slow, EvalConfig(episodes=1, progress=False))
    # right keys, wrong observation size: found on the environment's first observation
    short = _save_checkpoint(tmp_path / "ckpt-c", obs_dim=5)
    with pytest.raises(CheckpointMismatch, match=r"'observation' has shape \[5\]"):
        evaluate_checkpoint(short, EvalConfig(episodes=1, horizon=HORIZON, progress=False))


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from dopr.envs.collect import CollectConfig, collect

    path = str(tmp_path_factory.mktemp("demos") / "demos.zarr")
    collect(CollectConfig(task=TASK, n_episodes=2, out=path, workers=0, progress=False))
    return path


def test_demo_initial_states_and_compounding_error(checkpoint, demos):
    """Start from collected demonstrations; the curve's first point equals a by-hand computation."""
    from dopr.data import EpisodeStore
    from dopr.envs import make, make_expert
    from dopr.eval import measure_compounding_error
    from dopr.policies import load_policy

    curve = measure_compounding_error(checkpoint, demos, EvalConfig(episodes=2, horizon=HORIZON, progress=False))
    assert curve["count"][0] == 2 and len(curve["mean"]) == HORIZON
    assert all(a >= b for a, b in zip(curve["count"], curve["count"][1:]))
    with open(os.path.join(checkpoint, "eval", "compounding_error.json")) as f:
        assert json.load(f)["mean"] == curve["mean"]

    # by hand: demo i's first state, the policy's first action and the expert's label there
    store = EpisodeStore.open(demos)
    ends = store.episode_ends
    policy, env, expert = load_policy(checkpoint), make(TASK), make_expert(TASK)
    errors = []
    for start in (0, int(ends[0])):
        env.reset(seed=0)
        obs = env.reset_to_state(np.asarray(store.array("state")[start]))
        np.testing.assert_allclose(obs["observation"], store.array("observation")[start], atol=1e-9)
        history = torch.from_numpy(np.stack([obs["observation"]] * 2)[None]).float()
        action = policy.predict_action({"observation": history})[0, 0].double().numpy()
        expert.reset()
        errors.append(np.linalg.norm(action - expert.act(env)))
    assert curve["mean"][0] == pytest.approx(np.mean(errors), rel=1e-5)


def test_video_of_first_episode(checkpoint, tmp_path):
    import imageio.v3 as iio

    from dopr.eval import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, EvalConfig(episodes=2, horizon=10, videos=1, progress=False),
                                 out_dir=str(tmp_path))
    first, second = result.episodes
    assert "video" not in second
    if first.get("video") is None:
        pytest.skip(f"no offscreen rendering here: {first.get('video_error')}")
    frames = iio.imread(first["video"])
    assert frames.shape[0] == 11 and frames.shape[-1] == 3  # initial frame + one per step
    assert frames.std() > 1  # a rendered scene, not a blank image


def test_eval_command_line_from_demos_with_horizon_multiple(checkpoint, demos, tmp_path, capsys):
    from dopr.data import EpisodeStore
    from dopr.eval.results import read_episodes
    from dopr.scripts.cli import main

    out = str(tmp_path / "cli")
    rc = main(["eval", "--checkpoint", checkpoint, "--episodes", "3", "--init", "demos", "--demos", demos,
               "--horizon-mult", "1.5", "--out", out, "--quiet", "--threads", "1"])
    assert rc == 0 and "success 0/3" in capsys.readouterr().out
    saved = json.load(open(os.path.join(out, "results.json")))
    longest = int(max(EpisodeStore.open(demos).episode_lengths))
    assert saved["protocol"]["horizon"] == round(1.5 * longest) and saved["protocol"]["init"] == "demos"
    assert [e["demo"] for e in read_episodes(os.path.join(out, "episodes.jsonl"))] == [0, 1, 0]
    # bad input: a clear message and exit code 2, nothing evaluated
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "meta.json: missing" in capsys.readouterr().err


def test_bench_eval_prints_rates_and_latency(capsys):
    from dopr.eval.bench import main

    assert main(["--task", TASK, "--workers", "1", "--episodes-per-worker", "1", "--horizon", "40",
                 "--batches", "1,4"]) == 0
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("1 ")]
    raw, rate, ratio = float(row[1]), float(row[2]), float(row[3])
    assert raw > 0 and rate > 0 and ratio == pytest.approx(rate / raw, abs=0.01)
    assert "B=4" in out and "cpu" in out


# ---------------------------------------------------------------------------------------------
# interrupted evaluations are resumed, never reused as final; other protocols' results are not replaced


def _checkpoint_protocol(checkpoint):
    """What evaluate_checkpoint adds to the protocol, so evaluate_policy on the loaded policy evaluates the same."""
    return {"checkpoint": os.path.abspath(checkpoint), "ema": True, "step": 100, "val_loss": 0.5}


def test_interrupted_evaluation_is_resumed_to_the_uninterrupted_result(checkpoint, reference, tmp_path):
    from dopr.eval import evaluate_policy
    from dopr.policies import load_policy

    cfg = EvalConfig(episodes=4, horizon=HORIZON, progress=False)
    # one worker, 8 policy calls per episode: Ctrl-C during the second episode
    policy = _KillingPolicy(load_policy(checkpoint), at_call=12, sig=signal.SIGINT, worker_name=None)
    with pytest.raises(KeyboardInterrupt, match="run it again"):
        evaluate_policy(policy, TASK, cfg, out_dir=str(tmp_path), protocol=_checkpoint_protocol(checkpoint))
    saved = json.load(open(tmp_path / "results.json"))
    assert (saved["n_episodes"], saved["episodes_requested"], saved["complete"]) == (1, 4, False)
    first_line = open(tmp_path / "episodes.jsonl").readline()

    resumed = evaluate_policy(load_policy(checkpoint), TASK, cfg, out_dir=str(tmp_path),
                              protocol=_checkpoint_protocol(checkpoint))
    assert resumed.complete and resumed.timing["episodes_run"] == 3  # only the missing seeds ran
    assert _fingerprint(resumed.episodes) == _fingerprint(reference.episodes)
    assert open(tmp_path / "episodes.jsonl").readline() == first_line  # the kept episode, as it was written
    saved = json.load(open(tmp_path / "results.json"))
    assert (saved["n_episodes"], saved["episodes_requested"], saved["complete"]) == (4, 4, True)

    # complete with this protocol: returned as it is, nothing run, nothing rewritten
    mtime = os.path.getmtime(tmp_path / "results.json")
    again = evaluate_policy(load_policy(checkpoint), TASK, cfg, out_dir=str(tmp_path),
                            protocol=_checkpoint_protocol(checkpoint))
    assert again.timing["episodes_run"] == 0 and _fingerprint(again.episodes) == _fingerprint(reference.episodes)
    assert os.path.getmtime(tmp_path / "results.json") == mtime


def test_a_kill_after_the_last_episode_is_completed_from_the_episodes(checkpoint, reference, tmp_path):
    import shutil

    from dopr.eval import evaluate_checkpoint

    shutil.copytree(os.path.join(checkpoint, "eval"), tmp_path / "eval")
    # killed after the last episode's line, before the final results.json: the one written at the start stands
    saved = json.load(open(tmp_path / "eval" / "results.json"))
    json.dump({**saved, "n_episodes": 0, "complete": False}, open(tmp_path / "eval" / "results.json", "w"))
    again = evaluate_checkpoint(checkpoint, EvalConfig(episodes=4, horizon=HORIZON, progress=False),
                                out_dir=str(tmp_path / "eval"))
    assert again.timing["episodes_run"] == 0 and _fingerprint(again.episodes) == _fingerprint(reference.episodes)
    saved = json.load(open(tmp_path / "eval" / "results.json"))
    assert saved["complete"] and saved["n_episodes"] == 4 and saved["n_success"] == reference.n_success


def test_ad_hoc_eval_does_not_replace_a_result_of_another_protocol(checkpoint, reference, tmp_path, capsys):
    import shutil

    from dopr.scripts.cli import main

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, ckpt)  # holds the reference's complete 4-episode evaluation
    results = os.path.join(ckpt, "eval", "results.json")
    before = open(results).read()
    common = ["eval", "--checkpoint", ckpt, "--quiet", "--threads", "1"]
    for asked in (["--episodes", "2", "--horizon", str(HORIZON)], ["--episodes", "4", "--horizon", "10"]):
        assert main(common + asked) == 2
        err = capsys.readouterr().err
        assert results in err and "--out DIR" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
        assert open(results).read() == before
    assert "horizon 30 there, 10 here" in err
    # the same protocol with more episodes extends it: only the new seeds run
    assert main(common + ["--episodes", "5", "--horizon", str(HORIZON)]) == 0
    saved = json.load(open(results))
    assert (saved["n_episodes"], saved["complete"], saved["timing"]["episodes_run"]) == (5, True, 1)
    assert main(common + ["--episodes", "2", "--horizon", "10", "--overwrite"]) == 0
    saved = json.load(open(results))
    assert (saved["n_episodes"], saved["protocol"]["horizon"]) == (2, 10)


def test_dopr_eval_resumes_after_a_real_ctrl_c(checkpoint, tmp_path):
    import sys

    from dopr.eval import evaluate_checkpoint
    from dopr.eval.results import read_episodes
    from tests.interrupt_helpers import ctrl_c_after_lines

    # ~0.25 s per episode (a policy call every 2 steps): Ctrl-C after the first lands seconds before the end
    episodes, horizon, n_exec = 16, 100, 2
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "dopr", "eval", "--checkpoint", checkpoint, "--episodes", str(episodes),
           "--horizon", str(horizon), "--n-action-steps", str(n_exec), "--out", str(out), "--quiet", "--threads", "1"]
    assert ctrl_c_after_lines(cmd, str(out / "episodes.jsonl"), 1) == 130
    saved = json.load(open(out / "results.json"))
    assert saved["interrupted"] and not saved["complete"] and saved["episodes_requested"] == episodes, saved
    first = open(out / "episodes.jsonl").read().splitlines()
    assert 1 <= len(first) < episodes

    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"resuming, {len(first)} of {episodes} episodes kept" in proc.stdout
    saved = json.load(open(out / "results.json"))
    assert saved["complete"] and saved["timing"]["episodes_run"] == episodes - len(first)
    assert open(out / "episodes.jsonl").read().splitlines()[:len(first)] == first  # not run again
    whole = evaluate_checkpoint(checkpoint, EvalConfig(episodes=episodes, horizon=horizon, n_action_steps=n_exec,
                                                       progress=False), out_dir=str(tmp_path / "uninterrupted"))
    assert _fingerprint(read_episodes(str(out))) == _fingerprint(whole.episodes)
    assert saved["n_success"] == whole.n_success and saved["mean_return"] == whole.mean_return


# ---------------------------------------------------------------------------------------------
# temporal ensembling (ACT's): one implementation, dopr.temporal_ensemble, shared with dopr.deploy.runtime


def _run_worker(spec, chunks):
    """A rollout worker in this process (what an evaluation worker process runs): reset, then one act per chunk."""
    from dopr.eval.rollout_worker import Episode

    worker = spec.build()
    worker.reset(Episode(index=0, seed=3))
    return [worker.act(np.asarray(chunk), keep_last=1) for chunk in chunks]


def test_temporal_ensembling_executes_the_hand_computed_weighted_average():
    from dopr.eval.rollout_worker import EnvSpec

    decay, Ta, ticks = 0.3, 3, 6
    chunks = np.random.default_rng(0).uniform(-1, 1, (ticks, Ta, 2))  # reacher: 2 joint torques
    # tick t: row t-s of every chunk s still covering t (t-s < Ta), weighted exp(-decay j) with j = 0 the oldest
    blended = []
    for t in range(ticks):
        covering = [s for s in range(t + 1) if t - s < Ta]
        w = [math.exp(-decay * j) for j in range(len(covering))]
        blended.append(sum(wj * chunks[s][t - s] for wj, s in zip(w, covering)) / sum(w))
    ensembled = _run_worker(EnvSpec(TASK, horizon=HORIZON, temporal_ensemble=decay), chunks)
    executed = _run_worker(EnvSpec(TASK, horizon=HORIZON), [a[None] for a in blended])  # the blends, one per call
    assert [r["steps"] for r in ensembled] == list(range(1, ticks + 1))  # one action per chunk
    for got, want in zip(ensembled, executed):
        np.testing.assert_allclose(got["obs"][-1]["observation"], want["obs"][-1]["observation"], rtol=0, atol=1e-9)
    # and not what receding horizon would have run (each chunk's first row)
    first_rows = _run_worker(EnvSpec(TASK, horizon=HORIZON), chunks[:, :1])
    assert not np.allclose(first_rows[-1]["obs"][-1]["observation"], executed[-1]["obs"][-1]["observation"])


def test_evaluator_ensembles_every_control_step(checkpoint, tmp_path):
    from dopr.eval import evaluate_checkpoint

    def run(name, **kw):
        return evaluate_checkpoint(checkpoint, EvalConfig(episodes=2, horizon=HORIZON, progress=False, **kw),
                                   out_dir=str(tmp_path / name))

    ensembled = run("te", temporal_ensemble=0.1)
    assert ensembled.protocol["temporal_ensemble"] == 0.1 and ensembled.protocol["n_action_steps"] == 4
    assert ensembled.timing["policy_calls"] == ensembled.timing["env_steps"] == 2 * HORIZON  # a call per step
    # one-row chunks: the blend of one row is that row, so it is receding horizon with Ta = 1
    one_row = run("te1", temporal_ensemble=0.1, n_action_steps=1)
    assert _fingerprint(one_row.episodes) == _fingerprint(run("rh1", n_action_steps=1).episodes)
    assert _fingerprint(ensembled.episodes) != _fingerprint(run("rh", n_action_steps=1).episodes)


def test_dopr_eval_temporal_ensemble_is_a_protocol_of_its_own(checkpoint, reference, tmp_path, capsys):
    import shutil

    from dopr.scripts.cli import main

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, ckpt)  # holds the reference's complete receding-horizon evaluation
    results = os.path.join(ckpt, "eval", "results.json")
    common = ["eval", "--checkpoint", ckpt, "--episodes", "4", "--horizon", str(HORIZON), "--quiet", "--threads", "1"]
    # a results.json written before the option existed: no entry, which means without ensembling
    saved = json.load(open(results))
    del saved["protocol"]["temporal_ensemble"]
    json.dump(saved, open(results, "w"))
    assert main(common + ["--temporal-ensemble", "0.1"]) == 2
    assert "temporal_ensemble None there, 0.1 here" in capsys.readouterr().err
    assert main(common) == 0 and "reused" in capsys.readouterr().out  # the same protocol as before

    out = str(tmp_path / "te")
    assert main(common + ["--temporal-ensemble", "0.1", "--out", out]) == 0
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["complete"] and saved["protocol"]["temporal_ensemble"] == 0.1
    assert saved["timing"]["policy_calls"] == saved["timing"]["env_steps"] == 4 * HORIZON
    assert main(common + ["--out", out]) == 2  # receding horizon is not merged into it
    assert "temporal_ensemble 0.1 there, None here" in capsys.readouterr().err
