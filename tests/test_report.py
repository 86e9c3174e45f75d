"""`dopr report` over small real runs: dopr collect -> dopr train (two optimizers) -> dopr eval -> report."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

TASK = "reacher"
OPTIMIZERS = ("adamw", "dopr-adamw")
TAB10_BLUE, TAB10_ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny real training runs, every checkpoint evaluated closed-loop, one compounding-error curve."""
    from dopr.envs.collect import CollectConfig, collect
    from dopr.eval import EvalConfig, evaluate_checkpoint, measure_compounding_error
    from dopr.train import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    demos = str(root / "demos.zarr")
    collect(CollectConfig(task=TASK, n_episodes=6, out=demos, workers=0, progress=False))
    dirs = []
    for opt in OPTIMIZERS:
        out = root / "runs" / opt
        train(TrainConfig(data=demos, out=str(out), optim=opt, steps=60, batch_size=32, val_every=20,
                          ckpt_every=20, log_every=20, threads=1, progress=False, horizon=8, n_action_steps=4,
                          val_ratio=0.34))
        for ckpt in ("ckpt-0000020", "ckpt-final"):  # ckpt-0000040 stays unevaluated
            evaluate_checkpoint(str(out / ckpt), EvalConfig(episodes=2, horizon=20, progress=False))
        dirs.append(str(out))
    measure_compounding_error(os.path.join(dirs[1], "ckpt-final"), demos,
                              EvalConfig(episodes=2, horizon=20, progress=False))
    return dirs


def _has_colour(png: str, rgb) -> bool:
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    return bool(np.any(np.all(np.abs(img - np.array(rgb) / 255.0) < 0.03, axis=-1)))


def test_report_from_real_runs(runs, tmp_path):
    from dopr.eval.report import build_report

    path = build_report(runs, str(tmp_path))
    md = open(path).read()
    rows = [line for line in md.splitlines()
            if line.startswith("| ") and ("| adamw |" in line or "| dopr-adamw |" in line)]
    # the all-checkpoints table (12 columns): run, optimizer, policy, seed, step, val loss, success, CI, return, ...
    table = [[c.strip() for c in r.strip("|").split("|")] for r in rows if r.count("|") == 13]
    assert len(table) == 6  # 2 runs x steps 20, 40, 60 (ckpt-final repeats step 60 and is merged)
    for run in runs:
        for ckpt in ("ckpt-0000020", "ckpt-final"):
            meta = json.load(open(os.path.join(run, ckpt, "meta.json")))
            res = json.load(open(os.path.join(run, ckpt, "eval", "results.json")))
            (cells,) = [c for c in table if c[0] == os.path.basename(run) and c[4] == str(meta["step"])]
            assert cells[5] == f"{meta['val_loss']:.4g}" and cells[6] == f"{res['success_rate']:.3f}"
            assert cells[8] == (f"{res['mean_return']:.4g} ({res['return_ci_low']:.4g} to "
                                f"{res['return_ci_high']:.4g})")
            assert cells[9] == str(res["n_episodes"]) and cells[10] == "random" and cells[11] == "20"
        (unevaluated,) = [c for c in table if c[0] == os.path.basename(run) and c[4] == "40"]
        assert unevaluated[6:10] == ["-", "-", "-", "-"] and unevaluated[5] != "-"
    for name in ("success_vs_val_loss.png", "training_curves.png", "compounding_error.png", "paired_differences.png"):
        assert f"![{name}]({name})" in md and os.path.getsize(tmp_path / name) > 5000
    assert _has_colour(str(tmp_path / "training_curves.png"), TAB10_BLUE)
    assert _has_colour(str(tmp_path / "training_curves.png"), TAB10_ORANGE)
    saved = json.load(open(tmp_path / "report.json"))
    assert len(saved["checkpoints"]) == 6 and len(saved["compounding_error"]) == 1
    assert saved["compounding_error"][0]["optimizer"] == "dopr-adamw"
    # the final checkpoints as cells, and DoPr paired with AdamW (one seed: no interval over seeds)
    assert "DoPr against its base optimizer" in md
    (paired,) = [r for r in md.splitlines() if r.startswith(f"| {TASK} | mlp | dopr-adamw - adamw | final | 1 |")]
    assert "too few seeds to tell" in paired


def _ranks(v):  # distinct values here: rank = position in sorted order
    order = np.argsort(v)
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    return r


def _hand_rho(pts):
    x, y = _ranks([p[1] for p in pts]), _ranks([p[2] for p in pts])
    d = x - y
    n = len(pts)
    return 1 - 6 * np.sum(d * d) / (n * (n * n - 1))  # no ties



def _assert_rho_over_independent_runs(saved, text, points, steps):
    """rho (hand-computed) over 4 runs' final checkpoints, with a p-value, and within each step."""
    rho = _hand_rho([p for p in points if p[3] == steps[-1]])
    assert saved["final"]["all runs"]["rho"] == pytest.approx(rho) and saved["final"]["all runs"]["n"] == 4
    assert 0 < saved["final"]["all runs"]["p_value"] <= 1
    assert f"| all runs | final checkpoint of each run | {rho:+.3f} |" in text
    for step in steps:
        rho = _hand_rho([p for p in points if p[3] == step])
        assert saved["within_step"][str(step)]["rho"] == pytest.approx(rho)
        assert f"| all runs | step {step}, one checkpoint per run | {rho:+.3f} |" in text

def _write_successes(run_dirs, chosen, n=20, ckpts=("ckpt-0000020", "ckpt-0000040", "ckpt-final")):
    """results.json and episodes.jsonl of each run's checkpoints, written by the evaluator's own code, with the
    chosen number of successes out of n episodes: {run name: (k at ckpts[0], ...)}. Returns (run, val loss,
    success, step)."""
    from tests.run_folders import episodes, write_evaluation

    points = []
    for run in run_dirs:
        name = os.path.basename(run)
        for ckpt, k in zip(ckpts, chosen[name]):
            write_evaluation(os.path.join(run, ckpt), TASK, episodes(k, n=n))
            meta = json.load(open(os.path.join(run, ckpt, "meta.json")))
            points.append((name, meta["val_loss"], k / n, meta["step"]))
    return points


def _copies(runs, tmp_path) -> list[str]:
    copies = []
    for run in runs:
        copies.append(str(tmp_path / "runs" / os.path.basename(run)))
        shutil.copytree(run, copies[-1])
    return copies


@pytest.mark.parametrize("successes", [
    {"adamw": 38, "dopr-adamw": 38},  # 38/50 each: an exact tie, which used to be reported as adamw's win
    {"adamw": 40, "dopr-adamw": 34},  # 40/50 against 34/50: 0.67-0.89 and 0.54-0.79 overlap
    {"adamw": 34, "dopr-adamw": 40},
])
def test_final_checkpoints_tie_and_overlap_are_said(runs, tmp_path, successes):
    from dopr.eval.report import build_report

    copies = _copies(runs, tmp_path)
    points = _write_successes(copies, {k: (v,) for k, v in successes.items()}, n=50, ckpts=("ckpt-final",))
    build_report(copies, str(tmp_path / "out"))
    md = open(tmp_path / "out" / "report.md").read()
    (line,) = [line for line in md.splitlines() if line.startswith("- Final checkpoints")]
    lower_loss = min(points, key=lambda p: p[1])[0]
    if len(set(successes.values())) == 1:
        assert "highest mean success adamw and dopr-adamw (0.760, an exact tie)" in line
        assert line.endswith("validation loss picked one of the configurations tied for the highest success.")
        return
    best = max(successes, key=successes.get)
    other = min(successes, key=successes.get)
    assert f"highest mean success {best} (0.800)" in line
    intervals = {40: "0.67-0.89", 34: "0.54-0.79"}
    spans = f"{best} {intervals[40]}, {other} {intervals[34]}"
    if lower_loss == best:  # the most successful has the lower loss too, but the episodes cannot single it out
        assert line.endswith(f"validation loss picked the configuration success picked; the pooled 95% intervals of "
                             f"{other} overlap the best ({spans}), so the episodes do not single out {best} either.")
    else:
        assert line.endswith("validation loss did NOT pick the configuration with the highest success, but their "
                             f"pooled 95% intervals overlap ({spans}): the episodes do not resolve that difference.")


def test_report_correlations_match_hand_computed(runs, tmp_path):
    """The real runs, each copied as a second seed, with chosen success rates (results.json written by the
    evaluator's own code): rho over independent runs (final checkpoints; each step) against a hand computation,
    and the all-checkpoint rho shown as a description without a p-value."""
    from dopr.atomic import write_json_atomic
    from dopr.eval.report import build_report

    copies = []
    for run in runs:
        for seed in (0, 1):
            dst = tmp_path / "runs" / f"{os.path.basename(run)}-s{seed}"
            shutil.copytree(run, dst)
            copies.append(str(dst))
            if seed:  # another seed: its own validation losses and seed
                for meta_path in dst.glob("ckpt-*/meta.json"):
                    meta = json.loads(meta_path.read_text())
                    write_json_atomic(meta_path, {**meta, "val_loss": meta["val_loss"] * 1.05})
                write_json_atomic(dst / "config.json", {**json.loads((dst / "config.json").read_text()), "seed": 1})
    # successes of 20 episodes at steps 20, 40, 60
    chosen = {"adamw-s0": (4, 10, 17), "adamw-s1": (5, 12, 16), "dopr-adamw-s0": (18, 8, 2),
              "dopr-adamw-s1": (15, 9, 3)}
    points = _write_successes(copies, chosen)  # (run, val loss, success, step)
    build_report(copies, str(tmp_path / "out"))
    md = open(tmp_path / "out" / "report.md").read()
    saved = json.load(open(tmp_path / "out" / "report.json"))["spearman_val_loss_vs_success"]
    assert len({p[1] for p in points}) == 12 and len({p[2] for p in points}) == 12

    # independent units: the runs' final checkpoints, and the runs' checkpoints at one step
    _assert_rho_over_independent_runs(saved, md, points, steps=(20, 40, 60))
    finals = [p for p in points if p[3] == 60]
    for opt in OPTIMIZERS:  # two runs each: too few for a rank correlation
        assert saved["final"][opt]["n"] == 2 and saved["final"][opt]["rho"] is None  # NaN is written as null
        assert f"| {opt} | final checkpoint of each run | - | - | 2 |" in md
    # all 12 checkpoints: described, never tested as if independent
    rho = _hand_rho(points)
    assert saved["pooled_checkpoints"]["rho"] == pytest.approx(rho) and saved["pooled_checkpoints"]["n"] == 12
    assert saved["pooled_checkpoints"]["p_value"] is None and saved["pooled_checkpoints"]["n_runs"] == 4
    assert (f"| all checkpoints (descriptive) | every evaluated checkpoint of 4 runs, steps mixed | {rho:+.3f} | - "
            "| 12 |") in md
    assert f"- Pooled over all 12 evaluated checkpoints of 4 runs: rho={rho:+.2f}, a description only" in md
    assert "At a glance" in md
    # final checkpoints: 33/40 against 5/40, whose Wilson intervals separate
    (final_line,) = [line for line in md.splitlines() if line.startswith("- Final checkpoints")]
    lower_loss = min(OPTIMIZERS, key=lambda o: np.mean([p[1] for p in finals if p[0].rsplit("-s", 1)[0] == o]))
    if lower_loss == "adamw":
        assert "validation loss picked the configuration success picked" in final_line
    else:
        assert "intervals separate (dopr-adamw 0.05-0.26, adamw 0.68-0.91)" in final_line
        assert "would have cost 0.70 in success" in final_line
    assert _has_colour(str(tmp_path / "out" / "success_vs_val_loss.png"), TAB10_BLUE)
    assert _has_colour(str(tmp_path / "out" / "success_vs_val_loss.png"), TAB10_ORANGE)


def test_report_refuses_folders_without_checkpoints(tmp_path):
    from dopr.eval.report import build_report

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run folders|none of"):
        build_report([str(tmp_path / "empty")], str(tmp_path / "out"))


def test_compounding_error_shows_counts_median_and_stops_where_few_run(runs, tmp_path):
    """A curve whose late steps rest on 3 episodes, one diverging: the report shows the median up to the last
    step at which 5 episodes run, says how many run there, and plots the counts."""
    from dopr.atomic import write_json_atomic
    from dopr.eval.compounding_error import compounding_error_curve
    from dopr.eval.report import build_report
    from dopr.tests.test_statistics import _series

    copies = _copies(runs, tmp_path)
    curve = compounding_error_curve(_series())
    new, old = (os.path.join(run, "ckpt-final", "eval", "compounding_error.json") for run in copies)
    write_json_atomic(new, {"episodes": 20, **curve})
    write_json_atomic(old, {"episodes": 20, **{k: curve[k] for k in ("step", "mean", "std", "count")}})
    build_report(copies, str(tmp_path / "out"))
    md = open(tmp_path / "out" / "report.md").read()
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines()
            if line.startswith("| ") and " | 20 | me" in line}
    # median at step 0; at step 9, the last with all 20 running; shown up to step 29 with 8 running
    at9 = 0.1 * (1 + 9.5 / 20) + 0.09
    at29 = float(np.median([0.1 * (1 + i / 20) + 0.29 for i in range(12, 20)]))
    assert rows["adamw"].startswith(f"| adamw | 60 | 20 | median | 0.1475 | {at9:.4g} | 29 (8) | {at29:.4g} (")
    assert rows["adamw"].endswith(f" | {at29:.4g} |")  # the largest value shown: the divergence is cut off
    assert rows["dopr-adamw"].startswith("| dopr-adamw | 60 | 20 | mean | ")  # an older file: its mean, cut the same
    assert " | 29 (8) | " in rows["dopr-adamw"]
    assert "fewer than a quarter of its episodes, or fewer than 5, still run" in md
    assert os.path.getsize(tmp_path / "out" / "compounding_error.png") > 5000
    saved = json.load(open(tmp_path / "out" / "report.json"))["compounding_error"]
    assert {c["run"] for c in saved} == {"adamw", "dopr-adamw"}


def test_incomplete_and_unequal_evaluations_are_marked_not_mixed(runs, tmp_path):
    """An interrupted evaluation (here as a file written before results.json said `episodes_requested`:
    2 of 5 episodes done) is marked and left out of every number; unequal complete counts are said."""
    from dopr.eval import EvalConfig, evaluate_checkpoint
    from dopr.eval.comparison import MARK, cells_from_runs, comparison_table
    from dopr.eval.report import build_report

    adamw, dopr = _copies(runs, tmp_path)
    path = os.path.join(adamw, "ckpt-final", "eval", "results.json")
    old = json.load(open(path))
    for key in ("episodes_requested", "complete"):
        old.pop(key)
    old["protocol"]["episodes"], old["interrupted"] = 5, True
    json.dump(old, open(path, "w"))
    # the other run's final evaluation extended from 2 to 3 episodes (the same protocol: one more seed runs)
    extended = evaluate_checkpoint(os.path.join(dopr, "ckpt-final"), EvalConfig(episodes=3, horizon=20, progress=False))
    assert extended.complete and extended.timing["episodes_run"] == 1

    md = open(build_report([adamw, dopr], str(tmp_path / "report"))).read()
    (row,) = [r for r in md.splitlines() if r.startswith("| adamw |") and "| 60 |" in r]
    assert f"{MARK} incomplete, not used" in row and f"{MARK} 2 of 5 episodes" in row
    assert "1 evaluation(s) are incomplete" in md and "differ in episode count (2, 3)" in md
    saved = json.load(open(tmp_path / "report" / "report.json"))
    (final,) = [r for r in saved["checkpoints"] if r["run"] == "adamw" and r["step"] == 60]
    assert final["success_rate"] is None and final["incomplete"].startswith("2 of 5 episodes")
    (by_opt,) = [r for r in md.splitlines() if r.startswith("| adamw | 1 |")]
    assert by_opt.endswith("| - |")  # no mean success from an incomplete evaluation

    table = comparison_table(cells_from_runs([adamw, dopr]))
    (cell,) = [r for r in table.splitlines() if r.startswith(f"| {TASK} | mlp | adamw |")]
    # the final checkpoint's episodes, success and its interval; and the best one, picked without that evaluation
    assert cell.count(MARK) == 4 and "seed 0: 2 of 5 (incomplete) episodes" in table
    final, best = [r for r in table.splitlines() if "dopr-adamw - adamw" in r]
    assert "| final |" in final and final.endswith(f"{MARK} |")
    # adamw's best checkpoint is picked without its incomplete final evaluation, and marked for it
    assert "| best |" in best and best.endswith(f"{MARK} |")
    assert "seed 0: best among steps 20, the incomplete evaluation at step 60 left out" in table


def test_evaluation_killed_before_its_first_episode_is_marked(runs, tmp_path):
    """What a kill right after an evaluation began leaves (results.json with 0 of 5 episodes, success null, as a Ray
    run task killed at its first checkpoint left it): the report and table mark it instead of failing."""
    from dopr.eval.comparison import MARK, cells_from_runs, comparison_table
    from dopr.eval.report import build_report
    from tests.run_folders import write_evaluation

    adamw, dopr = _copies(runs, tmp_path)
    write_evaluation(os.path.join(adamw, "ckpt-final"), TASK, [], requested=5)
    assert json.load(open(os.path.join(adamw, "ckpt-final", "eval", "results.json")))["success_rate"] is None
    md = open(build_report([adamw, dopr], str(tmp_path / "report"))).read()
    (row,) = [r for r in md.splitlines() if r.startswith("| adamw |") and "| 60 |" in r]
    assert f"{MARK} 0 of 5 episodes" in row
    assert "seed 0: 0 of 5 (incomplete) episodes" in comparison_table(cells_from_runs([adamw, dopr]))


def test_return_task_report_correlations_match_hand_computed(tmp_path):
    """hopper runs (primary metric return), hand-built with 3 evaluated checkpoints each: Spearman's rho of
    validation loss and mean return over independent runs (final checkpoints; each step) against a hand
    computation, the all-checkpoint rho only described, the figure and the paired return differences."""
    from dopr.eval.report import build_report
    from tests.run_folders import write_study

    returns = {"adamw": {0: (500.0, 900.0, 1200.0), 1: (650.0, 950.0, 800.0)},
               "dopr-adamw": {0: (300.0, 1100.0, 1500.0), 1: (450.0, 1000.0, 1300.0)}}
    scale = {("adamw", 0): 1.0, ("adamw", 1): 1.3, ("dopr-adamw", 0): 0.8, ("dopr-adamw", 1): 1.1}
    runs = write_study(tmp_path / "runs", "hopper", returns,
                       val_loss=lambda optim, seed, step: scale[optim, seed] * 1000 / step)
    build_report(runs, str(tmp_path / "out"))
    md = open(tmp_path / "out" / "report.md").read()
    saved = json.load(open(tmp_path / "out" / "report.json"))["spearman_val_loss_vs_return"]["hopper"]
    points = [(f"{optim}-s{seed}", scale[optim, seed] * 1000 / step, value, step)
              for optim, by_seed in returns.items() for seed, values in by_seed.items()
              for step, value in zip((1000, 2000, 3000), values)]
    section = md[md.index("## Spearman rank correlation, validation loss vs return (hopper)"):]
    section = section[:section.index("\n## ")]

    _assert_rho_over_independent_runs(saved, section, points, steps=(1000, 2000, 3000))
    rho = _hand_rho(points)
    assert saved["pooled_checkpoints"]["rho"] == pytest.approx(rho) and saved["pooled_checkpoints"]["p_value"] is None
    assert f"| all checkpoints (descriptive) | every evaluated checkpoint of 4 runs, steps mixed | {rho:+.3f} | - " \
           "| 12 |" in section
    assert "Return against validation loss, hopper (its primary metric" in md
    assert "and training step moves both validation loss and return)" in md
    for name in ("return_vs_val_loss.png", "paired_return_differences.png"):
        assert f"![{name}]({name})" in md and os.path.getsize(tmp_path / "out" / name) > 5000
    assert _has_colour(str(tmp_path / "out" / "return_vs_val_loss.png"), TAB10_ORANGE)
    # the table under the report: paired mean-return differences on final and best checkpoints
    final, best = [r for r in md.splitlines() if r.startswith("| hopper | mlp | dopr-adamw - adamw |")]
    # final: 1500 - 1200 and 1300 - 800; best: the same but adamw seed 1 at its step 2000, 1300 - 950
    assert "| final | 2 | +400.00 |" in final and "| best | 2 | +325.00 |" in best


def test_arms_ranked_by_validation_loss_and_by_return_match_hand_computed(tmp_path):
    """Four arms of a return task, two runs each: the arms' mean final validation loss and return, their ranks and
    Spearman's rho over the four means, against a hand computation (the question "did validation loss rank the arms
    as return did?", asked of arms where the `final` correlation asks it of runs)."""
    from dopr.eval.report import build_report
    from tests.run_folders import write_study

    final_return = {"adamw": (1000.0, 1200.0), "dopr-adamw": (1500.0, 1300.0), "muon": (900.0, 700.0),
                    "dopr-muon": (2000.0, 1000.0)}  # means 1100, 1400, 800, 1500
    final_loss = {"adamw": (0.30, 0.34), "dopr-adamw": (0.20, 0.22), "muon": (0.50, 0.40),
                  "dopr-muon": (0.45, 0.35)}  # means 0.32, 0.21, 0.45, 0.40
    returns = {o: {s: (100.0, 200.0, final_return[o][s]) for s in (0, 1)} for o in final_return}
    runs = write_study(tmp_path / "runs", "hopper", returns,
                       val_loss=lambda o, s, step: final_loss[o][s] if step == 3000 else 1.0)
    build_report(runs, str(tmp_path / "out"))
    ranking = json.load(open(tmp_path / "out" / "report.json"))["spearman_val_loss_vs_return"]["hopper"]["arms"]
    arms = {a["optimizer"]: a for a in ranking["arms"]}
    # loss ranks (lowest first): dopr-adamw 1, adamw 2, dopr-muon 3, muon 4; return ranks (highest first): dopr-muon
    # 1, dopr-adamw 2, adamw 3, muon 4. rho of (loss, return) = rho of loss ranks vs (5 - return ranks):
    # d = (1-3), (2-2), (3-4), (4-1) -> sum d^2 = 4 + 0 + 1 + 9 = 14, rho = 1 - 6*14 / (4*15) = -0.4
    assert {o: (a["loss_rank"], a["return_rank"]) for o, a in arms.items()} == {
        "dopr-adamw": (1, 2), "adamw": (2, 3), "dopr-muon": (3, 1), "muon": (4, 4)}
    assert arms["dopr-muon"]["mean_return"] == pytest.approx(1500) and arms["muon"]["val_loss"] == pytest.approx(0.45)
    assert ranking["rho"] == pytest.approx(-0.4) and ranking["n"] == 4
    # exact p: of the 24 orderings, those with |rho| >= 0.4 (sum d^2 <= 14 or >= 26): 14 of them
    from itertools import permutations
    extreme = sum(abs(1 - 6 * sum((i - p) ** 2 for i, p in enumerate(perm)) / 60) >= 0.4 - 1e-12
                  for perm in permutations(range(4)))
    assert ranking["p_value"] == pytest.approx(extreme / 24)
    md = open(tmp_path / "out" / "report.md").read()
    section = md[md.index("## Arms ranked by validation loss and by return (hopper, final checkpoints)"):]
    assert "The lowest validation loss, dopr-adamw, ranks 2 of 4 in return; the highest return, dopr-muon, " \
           "ranks 3 in validation loss." in section
    assert "| dopr-muon | 2 | 0.4 | 3 | 1500.0 | 1 |" in section


def test_archive_keeps_what_the_report_reads_without_the_weights(runs, tmp_path):
    """`dopr archive` (a real process) on two real runs: the comparison table and the report's numbers read from the
    archive equal those read from the runs; no weights or videos are copied; archiving again copies nothing, and a
    changed evaluation is copied again."""
    import subprocess
    import sys

    from dopr.eval.comparison import cells_from_runs, comparison_table
    from dopr.eval.report import build_report

    unfinished = tmp_path / "unfinished"  # a run training has begun: config.json, no evaluated ckpt-final yet
    unfinished.mkdir()
    shutil.copyfile(os.path.join(runs[0], "config.json"), unfinished / "config.json")

    # a run whose final evaluation has begun: results.json written incomplete at its start, as the evaluator does
    evaluating = tmp_path / "evaluating"
    shutil.copytree(runs[0], evaluating)
    started = json.loads((evaluating / "ckpt-final" / "eval" / "results.json").read_text())
    started.update(n_episodes=0, success_rate=None, mean_return=None, complete=False)
    (evaluating / "ckpt-final" / "eval" / "results.json").write_text(json.dumps(started))

    def archive():
        proc = subprocess.run([sys.executable, "-m", "dopr", "archive", *runs, str(unfinished), str(evaluating),
                               "--out", str(tmp_path / "archive")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    said = archive()
    assert "archived 2 runs" in said and "2 not finished" in said
    assert not (tmp_path / "archive" / "unfinished").exists() and not (tmp_path / "archive" / "evaluating").exists()
    archived = [str(tmp_path / "archive" / os.path.basename(r)) for r in runs]
    files = [os.path.relpath(os.path.join(d, f), a) for a in archived for d, _, fs in os.walk(a) for f in fs]
    names = set(files)
    assert "ckpt-final/eval/results.json" in names and "ckpt-0000040/meta.json" in names
    assert "metrics.jsonl" in names and "ckpt-final/eval/compounding_error.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".pt", ".mp4"))]
    assert comparison_table(cells_from_runs(archived)) == comparison_table(cells_from_runs(runs))
    for name, folders in (("runs", runs), ("archive", archived)):
        build_report(folders, str(tmp_path / f"report-{name}"))
    from_runs, from_archive = (json.load(open(tmp_path / f"report-{n}" / "report.json")) for n in ("runs", "archive"))
    assert from_archive["spearman_val_loss_vs_success"] == from_runs["spearman_val_loss_vs_success"]
    without_path = [[{k: v for k, v in row.items() if k != "checkpoint"} for row in r["checkpoints"]]
                    for r in (from_runs, from_archive)]
    assert without_path[0] == without_path[1] and len(without_path[0]) == 6

    assert f"0 files copied, {len(files)} unchanged" in archive()
    results = os.path.join(runs[0], "ckpt-final", "eval", "results.json")
    original = open(results).read()
    try:
        data = json.loads(original)
        data["note"] = "changed"
        open(results, "w").write(json.dumps(data))
        assert f"1 files copied, {len(files) - 1} unchanged" in archive()
        assert json.load(open(os.path.join(archived[0], "ckpt-final", "eval", "results.json")))["note"] == "changed"
    finally:
        open(results, "w").write(original)  # the fixture's runs are shared by the module's other tests
