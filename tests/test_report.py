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
    # the all-checkpoints table (11 columns): run, optimizer, policy, seed, step, val loss, success, CI, ...
    table = [[c.strip() for c in r.strip("|").split("|")] for r in rows if r.count("|") == 12]
    assert len(table) == 6  # 2 runs x steps 20, 40, 60 (ckpt-final repeats step 60 and is merged)
    for run in runs:
        for ckpt in ("ckpt-0000020", "ckpt-final"):
            meta = json.load(open(os.path.join(run, ckpt, "meta.json")))
            res = json.load(open(os.path.join(run, ckpt, "eval", "results.json")))
            (cells,) = [c for c in table if c[0] == os.path.basename(run) and c[4] == str(meta["step"])]
            assert cells[5] == f"{meta['val_loss']:.4g}" and cells[6] == f"{res['success_rate']:.3f}"
            assert cells[8] == str(res["n_episodes"]) and cells[9] == "random" and cells[10] == "20"
        (unevaluated,) = [c for c in table if c[0] == os.path.basename(run) and c[4] == "40"]
        assert unevaluated[6:9] == ["-", "-", "-"] and unevaluated[5] != "-"
    for name in ("success_vs_val_loss.png", "training_curves.png", "compounding_error.png", "paired_differences.png"):
        assert f"![{name}]({name})" in md and os.path.getsize(tmp_path / name) > 5000
    assert _has_colour(str(tmp_path / "training_curves.png"), TAB10_BLUE)
    assert _has_colour(str(tmp_path / "training_curves.png"), TAB10_ORANGE)
    saved = json.load(open(tmp_path / "report.json"))
    assert len(saved["checkpoints"]) == 6 and len(saved["compounding_error"]) == 1
    assert saved["compounding_error"][0]["optimizer"] == "dopr-adamw"
    # the final checkpoints as cells, and DoPr paired with AdamW (one seed: no interval over seeds)
    assert "DoPr against its base optimizer" in md
    (paired,) = [r for r in md.splitlines() if r.startswith(f"| {TASK} | mlp | dopr-adamw - adamw | 1 |")]
    assert "too few seeds to tell" in paired


def test_report_correlations_match_hand_computed(runs, tmp_path):
    """Same real runs with chosen success rates (results.json written by the evaluator's own code)."""
    from dopr.atomic import write_json_atomic
    from dopr.eval.metrics import success_stats
    from dopr.eval.report import build_report
    from dopr.eval.results import EvalResult

    copies = []
    for run in runs:
        dst = tmp_path / "runs" / os.path.basename(run)
        shutil.copytree(run, dst)
        copies.append(str(dst))
    # successes of 20 episodes at steps 20, 40, 60
    chosen = {"adamw": (4, 10, 17), "dopr-adamw": (18, 8, 2)}
    points = []
    for run in copies:
        opt = os.path.basename(run)
        for ckpt, k in zip(("ckpt-0000020", "ckpt-0000040", "ckpt-final"), chosen[opt]):
            episodes = [{"episode": i, "success": i < k, "steps": 5, "return": 0.0,
                         "time_to_success": 5 if i < k else None}
                        for i in range(20)]
            result = EvalResult(task=TASK, **vars(success_stats(episodes)), protocol={"init": "random", "horizon": 20})
            write_json_atomic(os.path.join(run, ckpt, "eval", "results.json"), result.summary())
            points.append((opt, json.load(open(os.path.join(run, ckpt, "meta.json")))["val_loss"], k / 20))
    build_report(copies, str(tmp_path / "out"))
    md = open(tmp_path / "out" / "report.md").read()
    saved = json.load(open(tmp_path / "out" / "report.json"))["spearman_val_loss_vs_success"]

    def ranks(v):  # distinct values here: rank = position in sorted order
        order = np.argsort(v)
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        return r

    def hand_rho(pts):
        x, y = ranks([p[1] for p in pts]), ranks([p[2] for p in pts])
        d = x - y
        n = len(pts)
        return 1 - 6 * np.sum(d * d) / (n * (n * n - 1))  # no ties

    assert len({p[1] for p in points}) == 6 and len({p[2] for p in points}) == 6
    expected = hand_rho(points)
    assert saved["pooled"]["rho"] == pytest.approx(expected) and saved["pooled"]["n"] == 6
    assert f"| pooled | {expected:+.3f} |" in md
    for opt in OPTIMIZERS:
        rho = hand_rho([p for p in points if p[0] == opt])
        assert saved[opt]["rho"] == pytest.approx(rho) and saved[opt]["n"] == 3
        assert f"| {opt} | {rho:+.3f} |" in md
    assert "At a glance" in md
    # final checkpoints: 17/20 against 2/20, whose Wilson intervals separate
    (final_line,) = [line for line in md.splitlines() if line.startswith("- Final checkpoints")]
    lower_loss = min(OPTIMIZERS, key=lambda o: [p[1] for p in points if p[0] == o][-1])
    if lower_loss == "adamw":
        assert "validation loss ranked the optimizers as success did" in final_line
    else:
        assert "intervals separate (dopr-adamw 0.03-0.30, adamw 0.64-0.95)" in final_line
        assert "would have cost 0.75 in success" in final_line
    assert _has_colour(str(tmp_path / "out" / "success_vs_val_loss.png"), TAB10_BLUE)
    assert _has_colour(str(tmp_path / "out" / "success_vs_val_loss.png"), TAB10_ORANGE)


def test_report_refuses_folders_without_checkpoints(tmp_path):
    from dopr.eval.report import build_report

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run folders|none of"):
        build_report([str(tmp_path / "empty")], str(tmp_path / "out"))
