"""`dopr train --wandb` in wandb's offline mode: a real run on real reacher demonstrations, with a real closed-loop
evaluation and its video, read back from the offline run's .wandb file and compared with metrics.jsonl."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason='the wandb extra: pip install -e ".[wandb]"')

TASK = "reacher"
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records, each with a 7-byte header


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file (wandb ships no reader of its own any more)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    pos, pending = 7, b""  # the file header: ':W&B', magic, version
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]  # after a 4-byte checksum
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir, run_id) -> list[dict]:
    """Each offline run of `run_id` under WANDB_DIR (a resumed run adds one): its run record and history rows."""
    runs = []
    for path in sorted(Path(wandb_dir, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        run, history = None, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[row["_step"]] = row
        runs.append({"run": run, "history": history, "dir": path.parent})
    return runs


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from dopr.envs.collect import CollectConfig, collect

    path = str(tmp_path_factory.mktemp("demos") / "reacher.zarr")
    collect(CollectConfig(task=TASK, n_episodes=3, out=path, workers=0, progress=False))
    return path


def train(store, out, wandb_dir, *extra):
    from dopr.envs.rendering import offscreen_rendering_error

    videos = [] if offscreen_rendering_error() else ["--eval-videos", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline",
           "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "dopr.scripts.train", "--data", store, "--out", str(out), "--optim", "adamw",
           "--steps", "20", "--batch-size", "16", "--threads", "1", "--no-progress", "--log-every", "5",
           "--val-every", "10", "--ckpt-every", "10", "--eval-every", "10", "--eval-episodes", "2",
           "--eval-horizon", "10", *videos, "--wandb", "--wandb-project", "dopr-test", *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return bool(videos)


def assert_history_holds(history: dict, metrics: list[dict]):
    """Every number of every metrics.jsonl line is in the wandb row of its step, with the same value."""
    assert sorted(history) == [m["step"] for m in metrics]
    for m in metrics:
        row = history[m["step"]]
        numbers = {k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
        assert {k: row.get(k) for k in numbers} == numbers, m["step"]


def test_offline_run_holds_the_metrics_and_videos_and_a_resume_continues_it(store, tmp_path):
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    videos = train(store, out, wandb_dir)
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    (first,) = offline_runs(wandb_dir, run_id)
    assert (first["run"].run_id, first["run"].project, first["run"].display_name) == (run_id, "dopr-test", "run")
    metrics = read_metrics(out)
    keys = set().union(*metrics)
    assert {"train_loss", "lr", "val_loss", "eval_success_rate", "eval_episodes"} <= keys
    assert [m["step"] for m in metrics if "eval_success_rate" in m] == [10, 20]
    assert_history_holds(first["history"], metrics)
    if videos:  # the evaluation's mp4, uploaded as a wandb video (copied into the run's media folder)
        row = first["history"][10]  # a media value is logged as nested keys: eval_video_0/_type, /path, ...
        assert row["eval_video_0/_type"] == "video-file"
        assert (first["dir"] / "files" / row["eval_video_0/path"]).stat().st_size > 0
        assert metrics[1]["eval_videos"] == [str(out / "ckpt-0000010" / "eval" / "videos" / "episode_0000.mp4")]

    # killed after the step-10 checkpoint: the resumed run logs into the same wandb run (a second offline file
    # of the same id, which `wandb sync` merges) and re-logs steps 15 and 20 with the same numbers
    for name in ("ckpt-final", "ckpt-0000020"):
        shutil.rmtree(out / name)
    train(store, out, wandb_dir, "--resume")
    assert json.loads((out / "wandb.json").read_text())["id"] == run_id
    first, second = offline_runs(wandb_dir, run_id)
    assert second["run"].run_id == run_id
    resumed = read_metrics(out)
    assert_history_holds(second["history"], [m for m in resumed if m["step"] > 10])
    # deterministic resume: the re-logged losses are the first run's (throughput differs, it is timing)
    for step in (15, 20):
        assert second["history"][step]["train_loss"] == first["history"][step]["train_loss"]


def test_without_the_extra_the_error_names_the_install_command(tmp_path, monkeypatch):
    from dopr.train.wandb_log import WandbLog

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without the extra sees: ImportError
    with pytest.raises(SystemExit, match=r'--wandb needs wandb, an optional extra: pip install -e "\.\[wandb\]"'):
        WandbLog(tmp_path, {})
    assert not (tmp_path / "wandb.json").exists()
