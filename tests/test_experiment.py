"""`dopr experiment` end to end on a fast task: collect, train two optimizers with periodic closed-loop
evaluation, report, paired table; and a second invocation that reuses everything."""

from __future__ import annotations

import json
import os

import pytest

# configurations with their own settings: the settings must reach the runs, and the names the table
DOPR_CONFIG, ADAMW_CONFIG = "dopr-adamw:damping=0.3:lr=1e-3", "adamw:lr=1e-3"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    from dopr.eval.experiment import ExperimentConfig, run_experiment

    out = tmp_path_factory.mktemp("experiment")
    cfg = ExperimentConfig(tasks=["reacher"], policies=["mlp"], optims=[DOPR_CONFIG, ADAMW_CONFIG], seeds=2, demos=6,
                           steps={"mlp": 40}, eval_every=20, eval_episodes=3, compounding_episodes=2, workers=1,
                           batch_size=32, mlp_hidden_dim=48, norm_mode="gaussian", out=str(out))
    table = run_experiment(cfg)
    return cfg, table


def test_experiment_table_has_every_cell_and_the_paired_comparison(experiment):
    cfg, table = experiment
    rows = [r for r in table.splitlines() if r.startswith("| reacher")]
    cells = [r for r in rows if " - " not in r.split("|")[3]]  # the paired rows name "treatment - baseline"
    assert sorted(r.split("|")[3].strip() for r in cells) == [ADAMW_CONFIG, DOPR_CONFIG]
    for r in cells:
        assert r.split("|")[4].strip() == "2"  # seeds
        assert r.split("|")[5].strip() == "3"  # episodes per seed
        # evaluated at steps 20 and 40: each seed's best checkpoint is shown too
        assert r.count("|") == 11 and {step.strip() for step in r.split("|")[9].split(",")} <= {"20", "40"}
    paired = [r for r in rows if f"{DOPR_CONFIG} - {ADAMW_CONFIG}" in r]
    assert [r.split("|")[4].strip() for r in paired] == ["final", "best"]
    for run in os.listdir(os.path.join(cfg.out, "runs")):
        train_cfg = json.loads(open(os.path.join(cfg.out, "runs", run, "config.json")).read())
        assert (train_cfg["lr"], train_cfg["mlp_hidden_dim"], train_cfg["norm_mode"]) == (1e-3, 48, "gaussian"), run
        policy_cfg = json.loads(open(os.path.join(cfg.out, "runs", run, "ckpt-final", "config.json")).read())["policy"]
        assert (policy_cfg["mlp_hidden_dim"], policy_cfg["norm_mode"]) == (48, "gaussian"), run
        if run.startswith("reacher-mlp-dopr-adamw_damping0.3_lr1e-3-s"):
            assert (train_cfg["optim"], train_cfg["damping"]) == ("dopr-adamw", 0.3)
            assert train_cfg["configuration"] == DOPR_CONFIG
        else:
            assert run.startswith("reacher-mlp-adamw_lr1e-3-s"), run
            assert (train_cfg["optim"], train_cfg["configuration"]) == ("adamw", ADAMW_CONFIG)
    # every run was evaluated at step 20 and at the end, next to its validation loss
    for run in os.listdir(os.path.join(cfg.out, "runs")):
        metrics = [json.loads(line) for line in open(os.path.join(cfg.out, "runs", run, "metrics.jsonl"))]
        evaluated = [m["step"] for m in metrics if "eval_success_rate" in m]
        assert evaluated == [20, 40], run
    assert os.path.exists(os.path.join(cfg.out, "report", "report.md"))
    assert os.path.exists(os.path.join(cfg.out, "report", "compounding_error.png"))


def test_experiment_reuses_demos_and_finished_runs(experiment, capsys):
    from dopr.eval.experiment import run_experiment

    cfg, table = experiment
    finals = {run: os.path.getmtime(os.path.join(cfg.out, "runs", run, "ckpt-final", "meta.json"))
              for run in os.listdir(os.path.join(cfg.out, "runs"))}
    assert run_experiment(cfg) == table
    out = capsys.readouterr().out
    assert "trained and evaluated, reused" in out
    # runs found finished took no time: no ETA is made from their pace (it would say the rest takes none)
    assert "ETA after the first run not reused" in out and "ETA 00:00" not in out
    for run, mtime in finals.items():
        assert os.path.getmtime(os.path.join(cfg.out, "runs", run, "ckpt-final", "meta.json")) == mtime


def test_run_killed_just_before_its_final_checkpoint_is_finished_by_a_rerun(experiment, tmp_path, capsys):
    """What a kill between the last step's checkpoint and ckpt-final leaves (made exactly, in a copy of the
    experiment: that run's ckpt-final and last log line gone): the same command writes ckpt-final from the last
    step's checkpoint and evaluates it, giving the uninterrupted table."""
    import dataclasses
    import shutil

    from dopr.eval.experiment import run_experiment

    cfg, table = experiment
    copy = tmp_path / "experiment"
    shutil.copytree(cfg.out, copy)
    run = copy / "runs" / "reacher-mlp-adamw_lr1e-3-s0"
    shutil.rmtree(run / "ckpt-final")
    log = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(log[:-1]) + "\n")
    assert run_experiment(dataclasses.replace(cfg, out=str(copy))) == table
    assert f"{run.name}: resumed from its latest checkpoint, trained and evaluated" in capsys.readouterr().out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 40 and last["eval_success_rate"] == json.loads(log[-1])["eval_success_rate"]
    assert last["val_loss"] == json.loads(log[-1])["val_loss"]


def test_runs_lost_with_the_machine_are_read_from_their_archive(experiment, tmp_path, capsys):
    """A study whose run folders were lost (a new machine) and whose finished runs were archived (`dopr archive`, a
    real process, no weights): a new experiment folder with --archive trains only the run the archive lacks, and
    gives the table of the experiment that was never interrupted. An archived run of the same name with other
    settings is refused, naming its config.json and the setting."""
    import dataclasses
    import subprocess
    import sys

    from dopr.eval.experiment import run_experiment

    cfg, table = experiment
    runs = sorted(os.listdir(os.path.join(cfg.out, "runs")))
    kept = [os.path.join(cfg.out, "runs", run) for run in runs if run != "reacher-mlp-adamw_lr1e-3-s1"]
    subprocess.run([sys.executable, "-m", "dopr", "archive", *kept, "--out", str(tmp_path / "archive")], check=True,
                   capture_output=True)
    assert not any(f.endswith(".safetensors") for _, _, files in os.walk(tmp_path / "archive") for f in files)
    again = dataclasses.replace(cfg, out=str(tmp_path / "new"), demos_dir=os.path.join(cfg.out, "demos"),
                                archive=str(tmp_path / "archive"))
    assert run_experiment(again) == table
    said = capsys.readouterr().out
    assert f"3 of 4 runs found finished in {tmp_path / 'archive'}: not run again" in said
    assert os.listdir(tmp_path / "new" / "runs") == ["reacher-mlp-adamw_lr1e-3-s1"]
    assert "reacher-mlp-adamw_lr1e-3-s1: trained and evaluated" in said

    with pytest.raises(ValueError, match=r"archive/reacher-mlp-[^ ]*-s0/config.json is not this experiment's run .*"
                                         r"eval_episodes 3 here, 4 in this experiment"):
        run_experiment(dataclasses.replace(again, out=str(tmp_path / "other"), eval_episodes=4))


def test_every_policy_has_training_steps(tmp_path):
    from dopr.eval.experiment import ExperimentConfig, run_experiment
    from dopr.policies.config import POLICY_KINDS

    assert set(ExperimentConfig().steps) == set(POLICY_KINDS)
    # a config file's [steps] table that leaves out a policy it runs: said before anything is collected
    with pytest.raises(ValueError, match=r"no training steps for policy \['resmlp'\].*steps.resmlp"):
        run_experiment(ExperimentConfig(policies=["resmlp"], steps={"mlp": 10}, out=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()


def test_experiment_config_file_rejects_unknown_options(tmp_path):
    from dopr.eval.experiment import ExperimentConfig

    good = tmp_path / "exp.toml"
    good.write_text('tasks = ["lift", "can"]\nseeds = 5\n[steps]\nmlp = 100\n')
    cfg = ExperimentConfig.from_file(str(good))
    assert cfg.tasks == ["lift", "can"] and cfg.seeds == 5 and cfg.steps == {"mlp": 100}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"taks": ["lift"]}))
    with pytest.raises(ValueError, match=r"bad.json.*taks"):
        ExperimentConfig.from_file(str(bad))


@pytest.mark.parametrize("spec, message", [
    ("adamw:damping=0.3", "only apply to dopr"),
    ("sgd", "unknown optimizer 'sgd'"),
    ("dopr-adamw:gamma=1", "'gamma=1' is not KEY=VALUE"),
    ("dopr-adamw:lr", "'lr' is not KEY=VALUE"),
    ("dopr-adamw:lr=fast", "lr='fast' is not a float"),
    ("dopr-adamw:lr=1e-3:lr=3e-3", "lr given twice"),
])
def test_experiment_configuration_specs_are_checked(spec, message):
    from dopr.eval.experiment import Configuration

    with pytest.raises(ValueError, match=message):
        Configuration.parse(spec)
    configuration = Configuration.parse("dopr-muon:lr=3e-4:precond_every=20:stats=ema")
    assert (configuration.optim, configuration.slug) == ("dopr-muon", "dopr-muon_lr3e-4_precond_every20_statsema")
    assert (configuration.setting("precond_every", 10), configuration.setting("damping", 0.1)) == (20, 0.1)


def test_ctrl_c_mid_evaluation_then_a_rerun_completes_it(tmp_path, capsys):
    """A real Ctrl-C of `dopr experiment` during the final evaluation: the table marks the incomplete cell, and
    the same command run again evaluates only the missing episode seeds, giving the uninterrupted result."""
    import sys

    from dopr.eval import EvalConfig, evaluate_checkpoint
    from dopr.eval.comparison import MARK, cells_from_runs, comparison_table
    from dopr.eval.experiment import ExperimentConfig, run_experiment
    from dopr.eval.results import read_episodes
    from tests.interrupt_helpers import ctrl_c_after_lines

    episodes, horizon = 16, 150  # long episodes: Ctrl-C after the first lands seconds before the end
    cfg = ExperimentConfig(tasks=["reacher"], policies=["mlp"], optims=["adamw"], seeds=1, demos=3, steps={"mlp": 20},
                           eval_every=20, eval_episodes=episodes, horizon=horizon, compounding_episodes=0, workers=1,
                           batch_size=32, out=str(tmp_path))
    run = tmp_path / "runs" / "reacher-mlp-adamw-s0"
    cmd = [sys.executable, "-m", "dopr", "experiment", "--tasks", "reacher", "--policies", "mlp", "--optims", "adamw",
           "--seeds", "1", "--demos", "3", "--steps", "20", "--eval-every", "20", "--eval-episodes", str(episodes),
           "--horizon", str(horizon), "--compounding-episodes", "0", "--workers", "1", "--batch-size", "32",
           "--out", str(tmp_path)]
    assert ctrl_c_after_lines(cmd, str(run / "ckpt-final" / "eval" / "episodes.jsonl"), 1) == 130
    first = open(run / "ckpt-final" / "eval" / "episodes.jsonl").read().splitlines()
    assert 1 <= len(first) < episodes
    table = comparison_table(cells_from_runs([str(run)]))
    assert f"{len(first)} of {episodes} (incomplete)" in table
    row = next(r for r in table.splitlines() if r.startswith("| reacher"))
    assert row.count(MARK) == 3  # episodes, success and its interval: no plain number

    table = run_experiment(cfg)
    out = capsys.readouterr().out
    assert f"final checkpoint evaluated ({episodes - len(first)} episodes run)" in out and "reused" not in out
    assert MARK not in table
    assert open(run / "ckpt-final" / "eval" / "episodes.jsonl").read().splitlines()[:len(first)] == first
    # and training's log gets the final evaluation the Ctrl-C kept it from writing
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 20 and last["eval_episodes"] == episodes
    assert last["eval_success_rate"] == pytest.approx(
        sum(e["success"] for e in read_episodes(str(run / "ckpt-final" / "eval"))) / episodes)
    whole = evaluate_checkpoint(str(run / "ckpt-final"), EvalConfig(episodes=episodes, horizon=horizon, progress=False),
                                out_dir=str(tmp_path / "uninterrupted"))
    fingerprint = [(e["seed"], e["success"], e["steps"], e["return"]) for e in whole.episodes]
    assert [(e["seed"], e["success"], e["steps"], e["return"])
            for e in read_episodes(str(run / "ckpt-final" / "eval"))] == fingerprint
    # a third invocation reuses the now complete evaluation
    assert run_experiment(cfg) == table and "trained and evaluated, reused" in capsys.readouterr().out
