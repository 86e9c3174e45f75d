"""Reading a tuning grid (dopr.eval.tuning) and the Humanoid study's selection script over it, on hand-built runs
with chosen returns: the lr and form each rule takes, and the grid extensions it asks for, against hand reading."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dopr.eval.comparison import Cell, SeedResult
from dopr.eval.tuning import arm_name, better_form, tune_arms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECT = os.path.join(ROOT, "docs", "results", "humanoid", "select_tuned.py")


def cell(configuration: str, lr: float, returns: list[float]) -> Cell:
    seeds = [SeedResult(seed=100 + i, success={0: False, 1: False}, val_loss=0.1, step=10,
                        returns={0: r - 5.0, 1: r + 5.0}) for i, r in enumerate(returns)]
    return Cell("humanoid", "resmlp", configuration, seeds, optimizer=configuration.split(":")[0], lr=lr,
                metric="return")


def test_arm_name_drops_only_the_lr():
    assert arm_name("dopr-adamw:lr=1e-3:damping=0.1") == "dopr-adamw:damping=0.1"
    assert arm_name("adamw:lr=3e-4") == "adamw"


def test_chosen_lr_is_the_lowest_within_tolerance_of_the_best_and_ends_ask_for_more():
    grid = (1e-4, 3e-4, 1e-3, 3e-3)
    cells = [cell("adamw:lr=1e-4", 1e-4, [900, 1000]), cell("adamw:lr=3e-4", 3e-4, [1500, 1400]),  # 950, 1450
             cell("adamw:lr=1e-3", 1e-3, [1500, 1500]), cell("adamw:lr=3e-3", 3e-3, [1000, 1200]),  # 1500, 1100
             cell("muon:lr=1e-4", 1e-4, [2000, 2000]), cell("muon:lr=3e-4", 3e-4, [1000, 1000]),
             cell("muon:lr=1e-3", 1e-3, [500, 500]), cell("muon:lr=3e-3", 3e-3, [100, 100]),
             cell("signum:lr=1e-4", 1e-4, [100, 100]), cell("signum:lr=3e-4", 3e-4, [300, 300]),
             cell("signum:lr=1e-3", 1e-3, [500, 500]), cell("signum:lr=3e-3", 3e-3, [1000, 1000])]
    adamw, muon, signum = tune_arms(cells, 0.05, grid, seeds=2)
    # adamw: best 1500 at 1e-3; 1450 at 3e-4 is within 5% (>= 1425): the lower lr is taken, inside the grid
    assert (adamw.best_lr, adamw.chosen_lr, adamw.extend, adamw.complete) == (1e-3, 3e-4, [], True)
    assert adamw.mean(3e-4) == pytest.approx(1450)
    assert (muon.chosen_lr, muon.extend) == (1e-4, ["below"])
    assert (signum.chosen_lr, signum.extend) == (3e-3, ["above"])
    # with a 3% tolerance 1450 is not close enough to 1500 (< 1455)
    assert tune_arms(cells[:4], 0.03, grid, seeds=2)[0].chosen_lr == 1e-3
    # a grid still running is not complete: an lr missing, or a seed missing
    assert not tune_arms(cells[:3], 0.05, grid, seeds=2)[0].complete
    assert not tune_arms([*cells[:3], cell("adamw:lr=3e-3", 3e-3, [1000])], 0.05, grid, seeds=2)[0].complete


def test_an_alternative_form_is_taken_only_when_it_wins_by_more_than_the_margin():
    default = tune_arms([cell("adamw:lr=1e-3", 1e-3, [1000, 1000])])[0]
    close = tune_arms([cell("adamw:lr=1e-3:weight_decay=1e-2", 1e-3, [1040, 1060])])[0]  # 1050: 5.0% better
    clear = tune_arms([cell("adamw:lr=3e-4:weight_decay=1e-2", 3e-4, [1060, 1060])])[0]
    assert better_form(default, close, 0.05) is default
    assert better_form(default, clear, 0.05) is clear


def _study(root, returns: dict[str, list[float]], task: str = "humanoid") -> None:
    """Hand-built stage-1 runs: {arm: final return at lr 1e-4, 3e-4, 1e-3, 3e-3}, two seeds each (+-20 around it)."""
    from tests.run_folders import episodes, write_evaluation, write_run

    for arm, values in returns.items():
        optimizer, *settings = arm.split(":")
        for lr, value in zip((1e-4, 3e-4, 1e-3, 3e-3), values):
            configuration = ":".join([optimizer, f"lr={lr:.0e}".replace("e-0", "e-"), *settings])
            for seed, shift in ((100, -20.0), (101, 20.0)):
                run = write_run(root / "runs", f"{configuration}-s{seed}".replace(":", "_"), task=task,
                                optim=optimizer, seed=seed, lr=lr, policy="resmlp", configuration=configuration,
                                checkpoints={"ckpt-final": (10000, 0.3)})
                write_evaluation(os.path.join(run, "ckpt-final"), task, episodes(0, value + shift))


DOPR = "stats=batch:precond_every=20:damping_mode=trace:damping=0.1"
PAPER = "dopr-adamw:stats=same-batch:damping_mode=trace:damping=1e-4"


def _run_study():
    """The study driver, docs/results/humanoid/run_study.py (a script beside select_tuned.py, not a package module)."""
    sys.path.insert(0, os.path.dirname(SELECT))
    try:
        import run_study
    finally:
        sys.path.remove(os.path.dirname(SELECT))
    return run_study


def _select_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(ROOT), os.environ.get("PYTHONPATH", "")])}


def _select(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SELECT, str(root)], capture_output=True, text=True, timeout=300,
                          env=_select_env())


def test_selection_script_prints_the_reporting_optims_when_final(tmp_path):
    hill = [1000.0, 1500.0, 2000.0, 1200.0]  # best and chosen at 1e-3: inside the grid
    returns = {arm: hill for b in ("adamw", "muon", "signum", "adamuon") for arm in (b, f"dopr-{b}:{DOPR}")}
    returns["adamw:weight_decay=1e-2"] = [1000.0, 1500.0, 2090.0, 1200.0]  # 4.5% better: not taken
    returns[PAPER] = [1000.0, 2200.0, 1500.0, 1200.0]  # 10% better at 3e-4: taken
    _study(tmp_path, returns)
    done = _select(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '    "adamw:lr=1e-3",\n' in done.stdout and f'    "dopr-muon:lr=1e-3:{DOPR}",\n' in done.stdout
    assert '    "dopr-adamw:lr=3e-4:stats=same-batch:damping_mode=trace:damping=1e-4",\n' in done.stdout
    assert "weight_decay=1e-2\"" not in done.stdout.split("Final.")[1]
    assert "| adamw | 1000 (980, 1020) | 1500 (1480, 1520) | **2000 (1980, 2020)** | 1200 (1180, 1220) |" in done.stdout
    # the committed archive of the same runs (`dopr archive`: no runs/ level) gives the same selection
    archive = tmp_path / "archive" / "stage1-tune"
    subprocess.run([sys.executable, "-m", "dopr", "archive", *sorted(str(p) for p in (tmp_path / "runs").iterdir()),
                    "--out", str(archive)], check=True, capture_output=True, env=_select_env())
    assert _select(archive).stdout == done.stdout


def test_selection_script_asks_for_the_extension_past_an_end(tmp_path):
    hill = [1000.0, 1500.0, 2000.0, 1200.0]
    returns = {arm: hill for b in ("adamw", "muon", "signum", "adamuon") for arm in (b, f"dopr-{b}:{DOPR}")}
    returns["signum"] = [2000.0, 1500.0, 1000.0, 500.0]  # best at the low end: 3e-5 for signum and dopr-signum
    returns["adamw:weight_decay=1e-2"] = returns[PAPER] = hill
    _study(tmp_path, returns)
    done = _select(tmp_path)
    assert done.returncode == 1 and "Not final: the grid extensions" in done.stdout
    assert '    "signum:lr=3e-5",\n' in done.stdout and f'    "dopr-signum:lr=3e-5:{DOPR}",\n' in done.stdout
    assert "lr=1e-2" not in done.stdout


def test_walker2d_selection_reads_adamw_and_dopr_adamw_only(tmp_path):
    hill = [1000.0, 1500.0, 2000.0, 1200.0]
    _study(tmp_path, {"adamw": hill, f"dopr-adamw:{DOPR}": hill, "adamw:weight_decay=1e-2": hill, PAPER: hill},
           task="walker2d")
    done = _select(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split("Final.")[1].count('    "') == 2 and f'"dopr-adamw:lr=1e-3:{DOPR}",' in done.stdout
    # the Humanoid study reads the same runs as four arms short
    (tmp_path / "h").mkdir()
    _study(tmp_path / "h", {"adamw": hill, f"dopr-adamw:{DOPR}": hill, "adamw:weight_decay=1e-2": hill, PAPER: hill})
    assert "Not final: 6 arm(s) without a complete grid: muon" in _select(tmp_path / "h").stdout


def test_study_driver_writes_configs_that_differ_from_the_tuning_config_only_where_asked(tmp_path):
    import tomllib

    run_study = _run_study()
    from dopr.eval.experiment import ExperimentConfig

    humanoid = run_study.STUDIES["humanoid"]
    optims = ["adamw:lr=1e-3", f"dopr-adamw:lr=3e-3:{DOPR}"]
    text = run_study.derived_config(humanoid.config("stage1-tune"), "why\n\nhow", optims=optims, seeds=8,
                                    seed_offset=0, eval_every=2500, out="out/humanoid/report")
    assert text.startswith("# why\n#\n# how\ntasks = ")
    tune = ExperimentConfig.from_file(humanoid.config("stage1-tune"))
    (tmp_path / "humanoid.toml").write_text(text)
    derived = ExperimentConfig.from_file(str(tmp_path / "humanoid.toml"))
    assert (derived.optims, derived.seeds, derived.seed_offset, derived.eval_every, derived.out) == (
        optims, 8, 0, 2500, "out/humanoid/report")
    changed = {"optims", "seeds", "seed_offset", "eval_every", "out"}
    assert {k: v for k, v in vars(derived).items() if k not in changed} == {
        k: v for k, v in vars(tune).items() if k not in changed}
    with pytest.raises(AssertionError, match="no single 'not_a_key' line"):
        run_study.derived_config(humanoid.config("stage1-tune"), "x", not_a_key=1)
    # the committed Humanoid stage 1 is what the driver writes for Walker2d: its stage 0 config, the tuning optims
    # (a one-line optims list rewritten too), a final evaluation only, its own folder
    stage1 = run_study.derived_config(humanoid.config("stage0-demos5"), "x", optims=run_study.tuning_optims(humanoid),
                                      eval_every=10000, out=humanoid.out("stage1-tune"))
    assert tomllib.loads(stage1) == tomllib.loads(open(humanoid.config("stage1-tune")).read())
    walker = run_study.STUDIES["walker2d"]
    assert run_study.tuning_optims(walker) == [o for o in tomllib.loads(stage1)["optims"]
                                               if o.split(":")[0] in ("adamw", "dopr-adamw")]


@pytest.mark.parametrize("verdicts, expected", [
    ({}, ("run", 5)),
    ({5: "in"}, ("chosen", 5)),
    ({5: "below"}, ("run", 10)),
    ({5: "below", 10: "below", 25: "in"}, ("chosen", 25)),
    ({5: "below", 10: "above"}, ("run", 7)),  # the count between two that jump over the band
    ({5: "below", 10: "above", 7: "in"}, ("chosen", 7)),
    ({5: "below", 10: "below", 25: "below", 50: "above"}, ("run", 35)),
])
def test_stage0_rule_runs_the_counts_in_order_and_the_one_between(verdicts, expected):
    run_study = _run_study()
    assert run_study.stage0_next(verdicts) == expected


@pytest.mark.parametrize("verdicts, why", [
    ({5: "above"}, "5 demonstrations, the fewest run, lie above the band already"),
    ({5: "below", 10: "above", 7: "below"}, "7 lie below the band and 10 above it"),
    ({5: "below", 10: "above", 7: "above"}, "5 lie below the band and 7 above it"),
    ({5: "below", 10: "below", 25: "below", 50: "below"}, "even 50 demonstrations lie below the band"),
])
def test_stage0_rule_stops_where_the_protocol_says_nothing_more(verdicts, why):
    run_study = _run_study()
    action, text = run_study.stage0_next(verdicts)
    assert action == "stop" and text.startswith(why)


def test_study_driver_reads_the_committed_archives_after_a_lost_machine(tmp_path, monkeypatch):
    """What a new machine starts from: the committed archives. Both studies' stages are all done there (so none is run
    again, and the selection they give is the committed humanoid.toml's); a stage missing one archived run is not."""
    import shutil
    import tomllib

    run_study = _run_study()
    humanoid = run_study.STUDIES["humanoid"]
    for study in run_study.STUDIES.values():  # Walker2d's too: a new machine reruns nothing of either study
        for stage in ("stage1-tune", "stage1-extend", "report"):
            assert run_study.stage_done(study, stage), (study.task, stage)
    top = humanoid.archive("report")
    runs = sorted(name for name in os.listdir(top) if os.path.isdir(os.path.join(top, name)))
    shutil.copy(humanoid.config("report"), tmp_path / "humanoid.toml")
    shutil.copytree(top, tmp_path / "archive" / "report",
                    ignore=lambda folder, names: [runs[-1]] if os.path.samefile(folder, top) else [])
    monkeypatch.setattr(run_study, "HERE", str(tmp_path))
    assert not run_study.stage_done(humanoid, "report")  # the one run lost is run again
    monkeypatch.undo()
    _, extensions, final = run_study.selection([humanoid.archive("stage1-tune"), humanoid.archive("stage1-extend")])
    assert extensions == [] and final == tomllib.load(open(humanoid.config("report"), "rb"))["optims"]


def test_study_driver_runs_an_extension_written_before_an_interruption(tmp_path, monkeypatch):
    """A machine stopped after the rule wrote (and committed) the extension config but before its runs finished: the
    resumed driver runs that stage, it does not stop asking for a stage it could run itself."""
    import shutil

    run_study = _run_study()
    walker = run_study.STUDIES["walker2d"]
    for stage in ("stage1-tune", "stage1-extend"):
        shutil.copy(walker.config(stage), tmp_path)
    shutil.copytree(walker.archive("stage1-tune"), tmp_path / "archive" / "walker2d-stage1-tune")
    monkeypatch.setattr(run_study, "HERE", str(tmp_path))
    monkeypatch.setattr(run_study, "train_expert", lambda study, enabled: None)
    ran = []

    class Interrupted(Exception):
        pass

    def run_stage(study, stage, commit_archive):
        ran.append(stage)
        if stage != "stage1-tune":
            raise Interrupted  # its runs are what the real stage would do; the test stops here

    monkeypatch.setattr(run_study, "run_stage", run_stage)
    with pytest.raises(Interrupted):
        run_study.tune_and_report(walker, False)
    assert ran == ["stage1-tune", "stage1-extend"]
