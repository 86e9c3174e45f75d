"""The paired comparison's statistics against hand computation and scipy, the DoPr-to-base pairing
rule, and the row pooled over tasks."""

from __future__ import annotations

import math

import pytest

from dopr.eval.comparison import Cell, SeedResult, comparison_table, dopr_pairs, paired_comparison, t80, t975


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
    assert cols[4] == "5"
    assert float(cols[5]) == pytest.approx((0.1 + 0.0 - 0.1 + 0.0 + 0.2) / 5, abs=1e-3)
    assert sum(r.startswith("| square | mlp | dopr-adamw - adamw") for r in table.splitlines()) == 1
