"""The `dopr` command's front: --version, help that lists the tasks, arguments refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dopr.scripts.cli import main as dopr

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_projects(capsys):
    with pytest.raises(SystemExit) as exit_:
        dopr(["--version"])
    assert exit_.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.startswith(f"dopr {version} (from {ROOT})")


def test_collect_help_lists_every_task(capsys):
    from dopr.envs import list_tasks

    with pytest.raises(SystemExit):
        dopr(["collect", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "tasks with a scripted expert: lift, can," in out
    assert "Tasks without one (train one with `dopr expert train`): humanoid, walker2d, hopper, ant." in out
    for task in list_tasks():
        assert f" {task}," in out or f" {task}." in out, task


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dopr.tests.test_eval import _save_checkpoint

    return _save_checkpoint(tmp_path_factory.mktemp("run") / "ckpt-0000100")


@pytest.mark.parametrize("flag, value", [("--workers", "0"), ("--workers", "-1"), ("--episodes", "0")])
def test_eval_refuses_counts_below_one(checkpoint, capsys, flag, value):
    assert dopr(["eval", "--checkpoint", checkpoint, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag[2:]} must be >= 1" in err and f"got {value}" in err
    assert not os.path.exists(os.path.join(checkpoint, "eval"))


def test_eval_videos_without_offscreen_rendering_fails_at_once(checkpoint):
    """GLFW needs a display: with none, `dopr eval --videos` must stop before any episode and say what to
    install, instead of evaluating, writing no video and exiting 0 amid GLFW warnings."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "PYOPENGL_PLATFORM")}
    env["MUJOCO_GL"] = "glfw"
    proc = subprocess.run([sys.executable, "-m", "dopr", "eval", "--checkpoint", checkpoint, "--episodes", "2",
                           "--horizon", "5", "--videos", "1", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("dopr eval: error: videos (--videos) need offscreen rendering: "), proc.stderr
    assert "MUJOCO_GL='glfw'" in proc.stderr and "apt-get install -y libosmesa6" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "GLFWError" not in proc.stderr
    assert not os.path.exists(os.path.join(checkpoint, "eval"))  # no episode ran, no results written


def test_eval_compounding_error_prints_the_shown_part(tmp_path, capsys):
    from dopr.envs.collect import CollectConfig, collect
    from dopr.tests.test_eval import _save_checkpoint

    checkpoint = _save_checkpoint(tmp_path / "run" / "ckpt-0000100")  # its own: this test writes its eval/
    demos = str(tmp_path / "demos.zarr")
    collect(CollectConfig(task="reacher", n_episodes=2, out=demos, workers=0, progress=False))
    assert dopr(["eval", "--checkpoint", checkpoint, "--demos", demos, "--compounding-error", "--episodes", "2",
                 "--horizon", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "compounding error over 2 episodes from demonstration starts: median at step 0 " in out
    assert "(while at least 2 episodes run; success " in out


def test_user_errors_of_train_experiment_and_data_are_one_line(tmp_path, capsys):
    """A missing store, a file that is no store, an unknown task, a broken config file: `dopr COMMAND: error:
    ...` in one line and exit status 2, as the other commands answer, not a traceback."""
    (tmp_path / "notes.txt").write_text("not a store\n")
    (tmp_path / "broken.json").write_text('{"tasks": ["lift"]\n')
    missing, text, broken = tmp_path / "none.zarr", tmp_path / "notes.txt", tmp_path / "broken.json"
    cases = [
        (["train", "--data", str(missing), "--out", str(tmp_path / "run")], f"{missing}: no episode store there"),
        (["train", "--data", str(text), "--out", str(tmp_path / "run")], f"{text}: not a zarr group"),
        (["experiment", "--tasks", "nosuch", "--out", str(tmp_path / "exp")], "unknown task(s) ['nosuch']"),
        (["experiment", "--config", str(broken)], f"{broken}: not a valid json file"),
        (["data", "info", str(missing)], f"{missing}: no episode store there"),
    ]
    for argv, said in cases:
        assert dopr(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dopr {argv[0]}: error: {said}"), (argv, err)
        assert len(err.splitlines()) == 1, err
