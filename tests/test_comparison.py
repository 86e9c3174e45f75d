"""The paired comparison's statistics against hand computation and scipy, the DoPr-to-base pairing
rule, the row pooled over tasks, return tasks' paired return differences, and each run's best checkpoint
next to its final one, read from hand-built run folders."""

from __future__ import annotations

import math
import statistics

import pytest

from dopr.eval.comparison import (
    MARK,
    Cell,
    SeedResult,
    cells_from_runs,
    comparison_table,
    dopr_pairs,
    paired_comparison,
    t80,
    t975,
)
from dopr.eval.metrics import wilson_interval
from tests.run_folders import write_study


def _t_quantile_2df(p: float) -> float:
    """Student's t quantile at 2 degrees of freedom, in closed form: (2p - 1) / sqrt(2p(1 - p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


T975_2, T80_2 = _t_quantile_2df(0.975), _t_quantile_2df(0.8)  # 4.3027, 1.0607


def cell(task, name, optimizer, lr, rates_by_seed, episodes=10):
    """A cell whose seed s solves the first round(rate * episodes) of episodes 0..episodes-1."""
    seeds = [SeedResult(seed, {e: e < round(rate * episodes) for e in range(episodes)}, None, 100)
             for seed, rate in rates_by_seed.items()]
    return Cell(task, "mlp", name, seeds, optimizer=optimizer, lr=lr)


def test_paired_difference_interval_and_detectable_difference_by_hand():
    base = cell("lift", "adamw", "adamw", 1e-3, {0: 0.5, 1: 0.6, 2: 0.4})
    dopr = cell("lift", "dopr-adamw", "dopr-adamw", 1e-3, {0: 0.7, 1: 0.6, 2: 0.3})
    p = paired_comparison(dopr, base)
    diffs = [0.2, 0.0, -0.1]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    assert p.n_seeds == 3 and p.n_episodes == 10
    assert p.diff == pytest.approx(mean)
    assert (p.ci_low, p.ci_high) == pytest.approx((mean - 4.303 * se, mean + 4.303 * se), abs=1e-3)
    # 80% power with 2 degrees of freedom: t_0.975 + t_0.8 standard errors, not the normal's 2.80
    assert p.mde == pytest.approx((4.303 + 1.061) * se, abs=1e-3)
    # seed 0: episodes 5, 6 only DoPr; seed 2: episode 3 only AdamW
    assert (p.only_treatment, p.only_baseline) == (2, 1)
    assert p.verdict() == "no detectable difference"


def test_t_quantiles_are_students():
    # printed tables (e.g. NIST's): t_{0.975} and t_{0.8} at 1, 2, 10 and 30 degrees of freedom
    for df, q975, q80 in ((1, 12.706, 1.376), (2, 4.303, 1.061), (10, 2.228, 0.879), (30, 2.042, 0.854)):
        assert (t975(df), t80(df)) == (pytest.approx(q975, abs=1e-3), pytest.approx(q80, abs=1e-3))


def test_dopr_is_paired_with_its_base_at_the_same_lr_else_the_first():
    cells = [cell("lift", "adamw:lr=1e-3", "adamw", 1e-3, {0: 0.5}),
             cell("lift", "adamw:lr=1e-4", "adamw", 1e-4, {0: 0.5}),
             cell("lift", "dopr-adamw:lr=1e-4", "dopr-adamw", 1e-4, {0: 0.6}),
             cell("lift", "dopr-adamw:lr=3e-3", "dopr-adamw", 3e-3, {0: 0.6}),
             cell("lift", "dopr-muon", "dopr-muon", 1e-4, {0: 0.6}),  # no Muon cell: not compared
             cell("can", "adamw:lr=1e-4", "adamw", 1e-4, {0: 0.5})]  # another task: never paired across
    pairs = {(t.configuration, b.configuration) for t, b in dopr_pairs(cells)}
    assert pairs == {("dopr-adamw:lr=1e-4", "adamw:lr=1e-4"), ("dopr-adamw:lr=3e-3", "adamw:lr=1e-3")}


def test_the_same_pair_on_two_tasks_gets_a_row_over_all_units():
    cells = [cell("square", "adamw", "adamw", 3e-4, {0: 0.3, 1: 0.4}),
             cell("square", "dopr-adamw", "dopr-adamw", 3e-4, {0: 0.4, 1: 0.4}),
             cell("stack", "adamw", "adamw", 3e-4, {0: 0.6, 1: 0.7, 2: 0.5}),
             cell("stack", "dopr-adamw", "dopr-adamw", 3e-4, {0: 0.5, 1: 0.7, 2: 0.7})]
    table = comparison_table(cells)
    pooled = [r for r in table.splitlines() if r.startswith("| square+stack | mlp | dopr-adamw - adamw |")]
    assert len(pooled) == 1
    cols = [c.strip() for c in pooled[0].split("|")]
    # units (task, seed): square 0 and 1 do not merge with stack 0 and 1
    assert cols[4:6] == ["final", "5"]
    assert float(cols[6]) == pytest.approx((0.1 + 0.0 - 0.1 + 0.0 + 0.2) / 5, abs=1e-3)
    assert sum(r.startswith("| square | mlp | dopr-adamw - adamw") for r in table.splitlines()) == 1


def _hand_t(diffs):
    """Mean, 95% t interval and detectable difference of 3 paired differences, by hand."""
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2) / math.sqrt(3)
    return mean, mean - T975_2 * se, mean + T975_2 * se, (T975_2 + T80_2) * se


def _columns(table: str, start: str) -> list[list[str]]:
    return [[c.strip() for c in r.strip("|").split("|")] for r in table.splitlines() if r.startswith(start)]


def test_paired_return_difference_by_hand():
    """A return task: per seed the mean return difference over common episode seeds; mean, t interval and
    detectable difference over seeds; no discordant pairs (those are success's)."""
    def return_cell(name, optimizer, returns_by_seed):
        seeds = [SeedResult(seed, {e: True for e in range(len(r))}, None, 100, returns=dict(enumerate(r)))
                 for seed, r in returns_by_seed.items()]
        return Cell("hopper", "mlp", name, seeds, optimizer=optimizer, lr=1e-3, metric="return")

    base = return_cell("adamw", "adamw", {0: [100.0, 300.0], 1: [250.0, 150.0, 50.0], 2: [1000.0, 800.0]})
    dopr = return_cell("dopr-adamw", "dopr-adamw", {0: [400.0, 100.0], 1: [300.0, 150.0], 2: [1300.0, 1100.0]})
    p = paired_comparison(dopr, base)
    diffs = [(300 - 200) / 2, (50 + 0) / 2, 300.0]  # seed 1: its baseline's episode 2 has no partner
    mean, lo, hi, mde = _hand_t(diffs)
    assert p.diffs == pytest.approx(diffs) and p.n_episodes == 2 and p.metric == "return"
    assert (p.diff, p.ci_low, p.ci_high, p.mde) == pytest.approx((mean, lo, hi, mde), rel=1e-3)
    assert p.only_treatment is None and p.only_baseline is None
    # one seed: the episodes' paired differences give the standard error (sd 424.26 over 2 episodes)
    one = paired_comparison(return_cell("d", "dopr-adamw", {0: [400.0, 100.0]}),
                            return_cell("a", "adamw", {0: [100.0, 300.0]}))
    assert one.mde == pytest.approx((1.95996 + 0.8416) * 250.0, rel=1e-4)  # differences 300, -200: sd/sqrt(2) 250
    assert one.verdict() == "too few seeds to tell"


# the stack study's shape: each run evaluated at steps 1000, 2000 and (ckpt-final) 3000;
# successes of 10 episodes at each step
STACK = {"adamw": {0: (3, 6, 5), 1: (4, 4, 2), 2: (7, 5, 6)},
         "dopr-adamw": {0: (5, 8, 8), 1: (2, 6, 7), 2: (6, 9, 4)}}


def test_best_checkpoint_next_to_final_from_run_folders(tmp_path):
    """Three checkpoints per run: the best one is each run's own highest success (a tie goes to the later step),
    and the table gives the paired difference on final and on best checkpoints."""
    cells = {c.configuration: c for c in cells_from_runs(write_study(tmp_path, "stack", STACK))}
    assert [(s.seed, s.step, s.success_rate) for s in cells["adamw"].seeds] == [(0, 3000, 0.5), (1, 3000, 0.2),
                                                                                 (2, 3000, 0.6)]
    # seed 1: 0.4 at 1000 and 2000, the later wins; dopr seed 0: 0.8 at 2000 and 3000
    assert [(s.step, s.success_rate) for s in cells["adamw"].best] == [(2000, 0.6), (2000, 0.4), (1000, 0.7)]
    assert [(s.step, s.success_rate) for s in cells["dopr-adamw"].best] == [(3000, 0.8), (3000, 0.7), (2000, 0.9)]
    assert all(s.candidates == (1000, 2000, 3000) and not s.incomplete_steps for s in cells["adamw"].best)

    table = comparison_table(list(cells.values()))
    assert MARK not in table
    (adamw,) = _columns(table, "| stack | mlp | adamw |")
    low, high = wilson_interval(5 + 2 + 6, 30)  # the final checkpoints' episodes pooled
    assert adamw[5:9] == ["0.433 (0.208)", f"{low:.3f} to {high:.3f}", "0.567 (0.153)", "2000, 2000, 1000"]
    final, best = _columns(table, "| stack | mlp | dopr-adamw - adamw |")
    for row, checkpoint, diffs, discordant in ((final, "final", [0.3, 0.5, -0.2], "8 / 2"),
                                                (best, "best", [0.2, 0.3, 0.2], "7 / 0")):
        mean, lo, hi, mde = _hand_t(diffs)
        assert row[3:5] == [checkpoint, "3"] and float(row[5]) == pytest.approx(mean, abs=1e-3)
        assert row[6] == f"{lo:+.3f} to {hi:+.3f}" and row[7] == discordant
        assert float(row[8]) == pytest.approx(mde, abs=2e-3)
    assert final[9] == "no detectable difference" and best[9] == "dopr-adamw higher"


def test_best_checkpoint_leaves_out_an_incomplete_evaluation_and_is_marked(tmp_path):
    """adamw seed 1's step-1000 evaluation stopped after 6 of 10 episodes, all successful (the short, successful
    ones finish first): its 1.0 must not be picked; that run's best is marked, the final checkpoints are not."""
    from tests.run_folders import episodes

    study = {k: dict(v) for k, v in STACK.items()}
    study["adamw"][1] = (episodes(6, n=6), 4, 2)
    cells = {c.configuration: c for c in cells_from_runs(write_study(tmp_path, "stack", study))}
    best = cells["adamw"].best[1]
    assert (best.step, best.success_rate, best.candidates, best.incomplete_steps) == (2000, 0.4, (2000, 3000), (1000,))
    table = comparison_table(list(cells.values()))
    (adamw,) = _columns(table, "| stack | mlp | adamw |")
    assert MARK not in adamw[5] and adamw[7].endswith(MARK)
    final, best_row = _columns(table, "| stack | mlp | dopr-adamw - adamw |")
    assert MARK not in " ".join(final) and best_row[5].endswith(MARK) and best_row[9].endswith(MARK)
    assert ("- best checkpoints, stack mlp adamw: seed 1: best among steps 2000, 3000, the incomplete evaluation at "
            "step 1000 left out") in table


def test_return_task_table_final_and_best_from_run_folders(tmp_path):
    """hopper (primary metric return): the cells and paired rows are in mean return, the best checkpoint is the
    highest mean return, and two return tasks get no row pooled over them (their returns differ in scale)."""
    returns = {"adamw": {0: (900.0, 1500.0, 1200.0), 1: (700.0, 650.0, 1000.0), 2: (800.0, 400.0, 300.0)},
               "dopr-adamw": {0: (1000.0, 1400.0, 1600.0), 1: (500.0, 2000.0, 900.0), 2: (600.0, 700.0, 500.0)}}
    runs = write_study(tmp_path / "hopper", "hopper", returns) + write_study(tmp_path / "walker2d", "walker2d", returns)
    cells = cells_from_runs(runs)
    assert {c.metric for c in cells} == {"return"}
    table = comparison_table(cells)
    assert "| return mean (sd) |" in table and "success" not in table.split("\n\n")[0].split("\n")[0]
    (adamw,) = _columns(table, "| hopper | mlp | adamw |")
    final_returns, best_returns = [1200, 1000, 300], [1500, 1000, 800]  # best: seed 1 at 3000 beats 1000 and 2000
    assert adamw[5] == f"{statistics.mean(final_returns):.2f} ({statistics.stdev(final_returns):.2f})"
    assert adamw[7:9] == [f"{statistics.mean(best_returns):.2f} ({statistics.stdev(best_returns):.2f})",
                          "2000, 3000, 1000"]
    final, best = _columns(table, "| hopper | mlp | dopr-adamw - adamw |")
    for row, checkpoint, diffs in ((final, "final", [400.0, -100.0, 200.0]), (best, "best", [100.0, 1000.0, -100.0])):
        mean, lo, hi, mde = _hand_t(diffs)
        assert row[3:5] == [checkpoint, "3"] and float(row[5]) == pytest.approx(mean, abs=0.01)
        assert row[6] == f"{lo:+.2f} to {hi:+.2f}" and float(row[7]) == pytest.approx(mde, abs=0.01)
        assert len(row) == 9  # no discordant-pairs column
    assert "hopper+walker2d" not in table and len(_columns(table, "| walker2d | mlp | dopr-adamw - adamw |")) == 2


def test_one_seed_table_shows_no_nan(tmp_path):
    """One seed has no sd and no t interval over seeds: the table says so with "-", not "nan"."""
    runs = write_study(tmp_path, "hopper", {"adamw": {0: (900.0, 1500.0, 1200.0)},
                                            "dopr-adamw": {0: (1000.0, 1400.0, 1600.0)}})
    table = comparison_table(cells_from_runs(runs))
    assert "nan" not in table, table
    (adamw,) = _columns(table, "| hopper | mlp | adamw |")
    assert adamw[5] == "1200.00 (-)"
    final, _ = _columns(table, "| hopper | mlp | dopr-adamw - adamw |")
    assert final[5:7] == ["+400.00", "-"] and final[-1] == "too few seeds to tell"


def test_primary_metric_of_tasks():
    from dopr.envs import primary_metric

    assert [primary_metric(t) for t in ("hopper", "humanoid", "stack", "reacher", "nonesuch", None)] == [
        "return", "return", "success", "success", "success", "success"]
