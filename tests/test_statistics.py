"""The statistics behind the report, against hand-computed values: Spearman's exact p-value for few runs, and the
compounding-error curve's median, band and the steps it is shown at."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest


def test_spearman_p_value_is_exact_for_few_runs():
    from dopr.eval.metrics import spearman

    # 4 runs in perfect rank order: of the 24 orderings, only this one and its reverse are as extreme
    rho, p, n = spearman([0.1, 0.2, 0.3, 0.4], [0.2, 0.5, 0.6, 0.9])
    assert (rho, n) == (pytest.approx(1.0), 4) and p == pytest.approx(2 / 24)  # scipy's t approximation says 0
    # 5 runs: count by hand the orderings whose |rho| reaches the observed one (rho = 1 - 6 sum d^2 / (n^3 - n))
    y = [3, 1, 2, 5, 4]
    rho, p, n = spearman([1, 2, 3, 4, 5], y)
    observed = 1 - 6 * sum((i + 1 - r) ** 2 for i, r in enumerate(y)) / 120
    extreme = sum(abs(1 - 6 * sum((i + 1 - r) ** 2 for i, r in enumerate(o)) / 120) >= abs(observed) - 1e-12
                  for o in itertools.permutations(range(1, 6)))
    assert rho == pytest.approx(observed) and p == pytest.approx(extreme / 120)
    # beyond the exact range: scipy's approximation
    from scipy.stats import spearmanr

    x, y = np.arange(12), np.array([0, 2, 1, 3, 5, 4, 7, 6, 9, 8, 11, 10])
    assert spearman(x, y)[1] == pytest.approx(spearmanr(x, y).pvalue)


def _series():
    """20 episodes: 12 succeed after 10 steps, 4 after 30, 1 after 45, and 3 fail and run 60 steps, one of them
    diverging (error 20) from step 40. Episode i's error is 0.1 (1 + i/20) + 0.01 t."""
    lengths = [10] * 12 + [30] * 4 + [45] + [60] * 3
    series = {i: [0.1 * (1 + i / 20) + 0.01 * t for t in range(n)] for i, n in enumerate(lengths)}
    series[19] = [e if t < 40 else 20.0 for t, e in enumerate(series[19])]
    return series


def test_compounding_curve_median_band_counts_and_cut():
    from dopr.eval.compounding_error import MIN_RUNNING, compounding_error_curve, min_running, shown_part

    curve = compounding_error_curve(_series())
    assert [curve["count"][t] for t in (0, 9, 10, 30, 45, 59)] == [20, 20, 8, 4, 3, 3]
    assert curve["median"][0] == pytest.approx(0.1 * (1 + 9.5 / 20))  # the middle of episodes 0..19
    assert curve["q25"][0] == pytest.approx(0.1 * (1 + 4.75 / 20))  # numpy's linear interpolation: rank 4.75 of 19
    assert curve["q75"][0] == pytest.approx(0.1 * (1 + 14.25 / 20))
    # step 50: episodes 17, 18, 19 still run; the diverged one drives the mean, not the median
    assert curve["mean"][50] == pytest.approx((0.1 * (1 + 17 / 20) + 0.1 * (1 + 18 / 20) + 0.5 * 2 + 20.0) / 3)
    assert curve["median"][50] == pytest.approx(0.1 * (1 + 18 / 20) + 0.5)
    # shown while at least a quarter of the episodes, and at least MIN_RUNNING, run: steps 0..29 (8 run)
    assert MIN_RUNNING == 5 and min_running(20) == 5 and min_running(40) == 10 and min_running(3) == 3
    assert curve["min_running"] == 5
    part = shown_part(curve)
    assert part["step"] == list(range(30)) and part["count"][-1] == 8 and part["center_name"] == "median"
    assert max(part["center"]) < 1.0  # the divergence at step 40 is not shown
    # a file written before the median was recorded: the mean and mean +- sd, cut the same way
    old = {k: curve[k] for k in ("step", "mean", "std", "count")}
    part = shown_part(old)
    assert part["center_name"] == "mean" and part["step"] == list(range(30))
    assert part["low"][0] == pytest.approx(curve["mean"][0] - curve["std"][0])
    assert shown_part({"step": [], "mean": [], "std": [], "count": []})["step"] == []
    assert math.isclose(sum(curve["count"]), 12 * 10 + 4 * 30 + 45 + 3 * 60)
