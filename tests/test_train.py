"""`dopr train`: a real run folder, resume after a real SIGKILL, and DDP over 2 CPU processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_store

from dopr.policies import load_checkpoint_meta, load_policy

torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train_cmd(data, out, *extra, steps=40, policy="mlp", optim="dopr-adamw"):
    return [sys.executable, "-m", "dopr.scripts.train", "--data", str(data), "--out", str(out), "--policy", policy,
            "--optim", optim, "--steps", str(steps), "--batch-size", "32", "--seed", "3", "--threads", "1",
            "--no-progress", *extra]


def run(cmd, timeout=120):
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "demo.zarr")


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_layout_and_learning(store, tmp_path, capsys):
    from dopr.scripts.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", str(store), "--out", str(out), "--policy", "mlp", "--optim", "adamw",
               "--steps", "120", "--batch-size", "32", "--lr", "1e-3", "--val-every", "40", "--ckpt-every", "60",
               "--log-every", "20", "--threads", "1", "--no-progress"])
    assert rc == 0
    # the end of the run says what it reached and where the checkpoint is
    said = capsys.readouterr().out.strip().splitlines()[-1]
    final_val = load_checkpoint_meta(out / "ckpt-final")["val_loss"]
    assert said.startswith(f"trained 120 steps; final validation loss {final_val:.4g}, action MSE ")
    assert said.endswith(f"checkpoint {out / 'ckpt-final'}")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "metrics.jsonl", "tb", "ckpt-0000060", "ckpt-0000120", "ckpt-final",
         ".lock"])  # dopr.folder_lock's file: who trains here (the lock itself dies with its process)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["obs_keys"] == ["eef", "object"] and cfg["warmup_steps"] == 12
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [20, 40, 60, 80, 100, 120]
    vals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(vals) == 3 and vals[-1] < 0.5 * vals[0]
    assert all({"train_loss", "lr", "steps_per_s", "data_frac"} <= set(m) for m in metrics)
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine decays to 0 at the last step
    meta = load_checkpoint_meta(out / "ckpt-final")
    assert meta["step"] == 120 and meta["val_loss"] == vals[-1] and meta["task"] == "synthetic"
    assert meta["obs_shapes"] == {"eef": [3], "object": [5]} and meta["action_dim"] == 7
    assert meta["versions"]["mujoco"] == "3.6.0" and len(meta["dataset"]["fingerprint"]) == 64
    assert (meta["n_obs_steps"], meta["horizon"], meta["n_action_steps"], meta["control_freq"]) == (2, 16, 8, 20)
    state = torch.load(out / "ckpt-final" / "optimizer.pt", weights_only=True)
    assert state["step"] == 120 and "optimizer" in state and "scheduler" in state
    # the checkpoint alone acts: normalization is inside the policy
    from dopr.data import SequenceDataset

    val = SequenceDataset(str(store), ["eef", "object"], 2, 16, split="val", n_action_steps=8)
    import numpy as np

    batch = val[np.arange(len(val))]
    policy = load_policy(out / "ckpt-final")
    act = policy.predict_action(batch["obs"])
    assert act.shape == (len(val), 8, 7)
    mse = (act - batch["action"][:, 1:9]).pow(2).mean().item()
    assert mse < 0.5 * batch["action"].var(dim=0).mean().item()
    # an existing run folder is not overwritten by accident; the user is told in one line
    rc = main(["train", "--data", str(store), "--out", str(out), "--steps", "10", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"dopr train: error: {out}: holds checkpoints") and "--resume" in err
    assert len(err.splitlines()) == 1


def corrupt_copy(store, path, key: str, episode: int, step: int):
    """A copy of `store` with one NaN in data/<key> at `step` of `episode`."""
    import numpy as np

    from dopr.data import EpisodeStore

    shutil.copytree(store, path)
    arr = EpisodeStore.open(path, mode="a").array(key)
    start = EpisodeStore.open(path).episode_range(episode)[0]
    row = arr[start + step]
    row[1] = np.nan
    arr[start + step] = row
    return path


def test_nonfinite_data_fails_both_arms_alike(store, tmp_path):
    """One NaN in one action (a train episode) or one observation (a validation episode): `dopr train` stops
    before step 0 with one line naming the store, key, episode and step, exit status 2, for AdamW and DoPr alike."""
    from dopr.data import EpisodeStore, resolve_split

    train_idx, val_idx = resolve_split(EpisodeStore.open(store), 0.1, 0)  # training's default split
    cases = [("action", int(train_idx[2]), 7), ("object", int(val_idx[0]), 4)]
    for key, episode, step in cases:
        bad = corrupt_copy(store, tmp_path / f"nan-{key}.zarr", key, episode, step)
        errors = []
        for optim in ("adamw", "dopr-adamw"):
            out = tmp_path / f"run-{key}-{optim}"
            cli = [sys.executable, "-m", "dopr", "train", *train_cmd(bad, out, optim=optim)[3:]]
            res = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=120)
            assert res.returncode == 2, res.stderr[-2000:]
            errors.append(res.stderr)
            assert not list(out.glob("ckpt-*")), "it trained on the NaN"
        assert errors[0] == errors[1], errors  # both arms of a comparison fail the same way
        line = errors[0].strip()
        assert line == (f"dopr train: error: {bad}: data/{key} has NaN or inf in episode {episode} at step {step} "
                        f"(global step {EpisodeStore.open(bad).episode_range(episode)[0] + step})"), errors[0]


def test_metrics_log_is_strict_json(tmp_path):
    """A NaN or inf metric (a diverged loss, a NaN validation) is written as null: every line is strict JSON,
    also the lines kept when a resumed run rewrites the log."""
    from dopr.train.metrics_log import MetricsLog

    def strict(text):
        def refuse(token):
            raise ValueError(f"not JSON: {token}")

        return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]

    log = MetricsLog(tmp_path, 0)
    log.write({"step": 1, "train_loss": float("nan"), "val_loss": float("inf"), "lr": 1e-3})
    log.write({"step": 2, "train_loss": 0.5, "val_loss": -float("inf")})
    log.close()
    assert strict((tmp_path / "metrics.jsonl").read_text()) == [
        {"step": 1, "train_loss": None, "val_loss": None, "lr": 1e-3}, {"step": 2, "train_loss": 0.5, "val_loss": None}]
    MetricsLog(tmp_path, 1).close()  # resumed at step 1: the kept line is rewritten
    assert strict((tmp_path / "metrics.jsonl").read_text()) == [
        {"step": 1, "train_loss": None, "val_loss": None, "lr": 1e-3}]


def test_generative_policy_with_images_trains(tmp_path):
    store = make_store(tmp_path / "img.zarr", n_episodes=4, length=12, image=True)
    out = tmp_path / "flow"
    from dopr.scripts.cli import main

    rc = main(["train", "--data", str(store), "--out", str(out), "--policy", "flow", "--optim", "dopr-adamw",
               "--steps", "6", "--batch-size", "8", "--down-dims", "16,32", "--val-ratio", "0.25", "--val-every", "3",
               "--ckpt-every", "0", "--log-every", "3", "--inference-steps", "2", "--threads", "1", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt-final"]
    meta = load_checkpoint_meta(out / "ckpt-final")
    assert meta["obs_shapes"]["cam"] == [16, 16, 3] and meta["val_action_mse"] is not None
    assert load_policy(out / "ckpt-final").config.num_inference_steps == 2


def test_resume_after_kill_matches_uninterrupted(store, tmp_path):
    steps = 200
    extra = ["--ckpt-every", "20", "--val-every", "50", "--log-every", "20"]
    full = tmp_path / "full"
    run(train_cmd(store, full, *extra, steps=steps))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(store, killed, *extra, steps=steps), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (killed / "ckpt-0000040").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "ckpt-final").exists(), "killed too late: the test would prove nothing"
    run(train_cmd(store, killed, *extra, "--resume", steps=steps))

    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(full / "ckpt-final" / name), load_file(killed / "ckpt-final" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    sa = torch.load(full / "ckpt-final" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(killed / "ckpt-final" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    for i in sa:
        for k, v in sa[i].items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb[i][k]), (i, k)
    # the log reads as one run: every step once, the same numbers
    ma, mb = read_metrics(full), read_metrics(killed)
    assert [m["step"] for m in mb] == [m["step"] for m in ma]
    assert [m.get("train_loss") for m in mb] == [m.get("train_loss") for m in ma]
    assert [m.get("val_loss") for m in mb] == [m.get("val_loss") for m in ma]


def test_resume_killed_just_before_the_final_checkpoint_writes_it(store, tmp_path):
    """Killed after the last step's checkpoint, before ckpt-final (that state made exactly: the finished run without
    ckpt-final and without its last log line): resuming writes the same ckpt-final and log line, not nothing."""
    extra = ["--ckpt-every", "20", "--val-every", "20", "--log-every", "20"]
    run_dir, uninterrupted = tmp_path / "run", tmp_path / "uninterrupted-final"
    run(train_cmd(store, run_dir, *extra, steps=40))
    full_log = read_metrics(run_dir)
    shutil.move(run_dir / "ckpt-final", uninterrupted)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in full_log[:-1]))

    run(train_cmd(store, run_dir, *extra, "--resume", steps=40))
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(uninterrupted / name), load_file(run_dir / "ckpt-final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    before, after = load_checkpoint_meta(uninterrupted), load_checkpoint_meta(run_dir / "ckpt-final")
    assert (after["step"], after["val_loss"]) == (before["step"], before["val_loss"]) == (40, full_log[-1]["val_loss"])
    resumed_log = read_metrics(run_dir)
    assert [m["step"] for m in resumed_log] == [20, 40] and resumed_log[-1]["val_loss"] == full_log[-1]["val_loss"]


def test_ddp_two_processes_match_one(store, tmp_path):
    """2 gloo ranks, each on half of every batch, DoPr statistics all-reduced == one process on the whole batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--ckpt-every", "0", "--val-every", "10", "--log-every", "10"]
    run(train_cmd(store, one, *extra, steps=20))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         *train_cmd(store, two, *extra, steps=20)[1:]], timeout=180)
    a, b = load_file(one / "ckpt-final" / "model.safetensors"), load_file(two / "ckpt-final" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    state = torch.load(two / "ckpt-final" / "optimizer.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG, for resuming with 2 processes
    assert read_metrics(two)[-1]["step"] == 20


def test_step_batches_are_a_function_of_the_step():
    import numpy as np

    from dopr.train.batches import StepBatches

    a, b = StepBatches(100, 32, seed=5), StepBatches(100, 32, seed=5)
    seen = np.concatenate([a(s) for s in range(25)])  # 800 samples = 8 epochs
    # no hidden iterator state
    assert np.array_equal(b(13), a(13)) and np.array_equal(StepBatches(100, 32, 5)(13), a(13))
    assert np.array_equal(np.bincount(seen, minlength=100), np.full(100, 8))  # each window once per epoch
    assert not np.array_equal(StepBatches(100, 32, seed=6)(0), a(0))
    assert not np.array_equal(seen[:100], seen[100:200])  # epochs are reshuffled


def test_plot_curves_draws_png(store, tmp_path):
    from dopr.policies.curves import plot_curves
    from dopr.scripts.cli import main

    out = tmp_path / "r"
    main(["train", "--data", str(store), "--out", str(out), "--steps", "20", "--batch-size", "16", "--val-every", "10",
          "--ckpt-every", "0", "--log-every", "10", "--threads", "1", "--no-progress"])
    png = plot_curves([out], tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.slow
def test_eval_every_logs_closed_loop_success(tmp_path):
    """Real lift demos, real training, real closed-loop evaluation from inside the training loop."""
    data, out = tmp_path / "lift.zarr", tmp_path / "run"
    run([sys.executable, "-m", "dopr", "collect", "--task", "lift", "--episodes", "10", "--out", str(data),
         "--workers", "0"],
        timeout=600)
    run(train_cmd(data, out, "--ckpt-every", "0", "--val-every", "150", "--log-every", "150", "--eval-every", "300",
                  "--eval-episodes", "2", "--lr", "1e-3", steps=300, optim="adamw"), timeout=900)
    last = read_metrics(out)[-1]
    # the logged rate is the final checkpoint's evaluation, as written next to it
    results = json.loads((out / "ckpt-final" / "eval" / "results.json").read_text())
    assert last["step"] == 300 and last["eval_episodes"] == results["n_episodes"] == 2
    assert last["eval_success_rate"] == results["success_rate"] == results["n_success"] / 2


@pytest.mark.slow
def test_ddp_resume_matches_uninterrupted(store, tmp_path):
    """2 ranks: resuming from a mid-run checkpoint (each rank's own RNG restored) == the uninterrupted run."""
    import shutil

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    extra = ["--ckpt-every", "10", "--val-every", "10", "--log-every", "10"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519"]
    run([*torchrun, *train_cmd(store, full, *extra, steps=20)[1:]], timeout=180)
    shutil.copytree(full, resumed)  # a moved run folder resumes too
    shutil.rmtree(resumed / "ckpt-final")
    shutil.rmtree(resumed / "ckpt-0000020")
    run([*torchrun, *train_cmd(store, resumed, *extra, "--resume", steps=20)[1:]], timeout=180)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(full / "ckpt-final" / name), load_file(resumed / "ckpt-final" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_dopr_options_reach_the_optimizer(store, tmp_path):
    """--stats ema keeps an EMA of each layer's input moments in the optimizer state; the default does not."""
    from dopr.scripts.cli import main

    def sigma_ema_layers(out, *extra):
        rc = main(["train", "--data", str(store), "--out", str(out), "--optim", "dopr-adamw", "--steps", "4",
                   "--batch-size", "32", "--val-every", "0", "--ckpt-every", "0", "--threads", "1", "--no-progress",
                   *extra])
        assert rc == 0
        state = torch.load(out / "ckpt-final" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
        return sum("sigma_ema" in s for s in state.values())

    assert sigma_ema_layers(tmp_path / "batch") == 0
    assert sigma_ema_layers(tmp_path / "ema", "--stats", "ema", "--precond-every", "2", "--damping", "0.3") > 0
    cfg = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert (cfg["stats"], cfg["precond_every"], cfg["damping"]) == ("ema", 2, 0.3)


def test_resume_completes_the_evaluation_a_kill_interrupted(store, tmp_path):
    """Ctrl-C during the evaluation at step 20: the resumed run evaluates ckpt-0000020 again (the evaluator then
    runs only its missing episodes) and logs it, instead of going on with that checkpoint half evaluated."""
    import shutil

    from dopr.train import TrainConfig, train

    calls = []

    def evaluate(checkpoint):  # the evaluation seam of train(); the evaluator's resume is tested in test_eval
        calls.append(Path(checkpoint).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"eval_success_rate": 0.25, "eval_episodes": 3}

    cfg = TrainConfig(data=str(store), out=str(tmp_path), optim="adamw", steps=30, batch_size=32, eval_every=10,
                      eval_episodes=3, threads=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, evaluate)
    resumed = TrainConfig(**{**vars(cfg), "resume": "latest"})
    train(resumed, evaluate)
    assert calls == ["ckpt-0000010", "ckpt-0000020", "ckpt-0000020", "ckpt-final"]
    assert [m["step"] for m in read_metrics(tmp_path) if "eval_success_rate" in m] == [10, 20, 30]
    # resumed from a checkpoint whose evaluation finished and was logged: not evaluated again
    for name in ("ckpt-final", "ckpt-0000030", "ckpt-0000020"):
        shutil.rmtree(tmp_path / name)
    train(resumed, evaluate)
    assert calls[4:] == ["ckpt-0000020", "ckpt-final"]


def test_resume_takes_an_option_newer_than_the_checkpoint_at_its_default(store, tmp_path):
    """A run checkpointed before --norm-mode existed ran with limits: it resumes as such, and not as gaussian."""
    import dataclasses

    from dopr.data import EpisodeStore
    from dopr.train import TrainConfig
    from dopr.train.checkpointing import check_resume_config
    from dopr.train.config import resolve_defaults

    cfg = resolve_defaults(TrainConfig(data=str(store), out=str(tmp_path)), EpisodeStore.open(store))
    saved = dataclasses.asdict(cfg)
    del saved["norm_mode"]
    check_resume_config(saved, cfg, tmp_path)
    with pytest.raises(ValueError, match="norm_mode: checkpoint 'limits' vs now 'gaussian'"):
        check_resume_config(saved, dataclasses.replace(cfg, norm_mode="gaussian"), tmp_path)
