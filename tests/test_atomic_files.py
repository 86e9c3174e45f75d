"""Files written atomically get the user's umask, and every JSON file or line written is strict JSON."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_umask(tmp_path, umask):
    from dopr.atomic import atomic_path, write_json_atomic, write_text_atomic

    write_text_atomic(tmp_path / "report.md", "# r\n")
    write_json_atomic(tmp_path / "results.json", {"a": 1})
    with atomic_path(tmp_path / "model.bin") as tmp, open(tmp, "wb") as f:
        f.write(b"x")
    write_text_atomic(tmp_path / "report.md", "# again\n")  # replacing keeps the umask's mode too
    for name in ("report.md", "results.json", "model.bin"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert sorted(os.listdir(tmp_path)) == ["model.bin", "report.md", "results.json"]  # no temporaries left


def test_checkpoint_files_all_get_the_umask(tmp_path, umask):
    """A real checkpoint folder: every file (optimizer.pt was 0644, the JSON files 0600) is readable as the
    umask allows, so a controller account in the group can load it."""
    from dopr.policies import save_checkpoint
    from dopr.tests.test_policies import build_policy, make_batch, make_config, stats_of

    cfg = make_config("mlp")
    policy = build_policy(cfg, stats_of(make_batch(cfg)))
    ckpt = save_checkpoint(tmp_path / "ckpt-0000001", policy, policy, {"step": 1}, {}, {"step": 1})
    modes = {p.name: _mode(p) for p in ckpt.iterdir()}
    assert len(modes) == 5 and set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


def test_json_is_strict_with_nan_and_inf_as_null(tmp_path):
    from dopr.atomic import json_line, json_safe, write_json_atomic

    record = {"step": 3, "val_loss": float("nan"), "grad": np.float32("inf"), "hist": [1.0, -math.inf],
              "arr": np.array([0.5, np.nan]), "nested": {"x": (float("nan"), 2)}, "ok": True, "name": "a"}
    expected = {"step": 3, "val_loss": None, "grad": None, "hist": [1.0, None], "arr": [0.5, None],
                "nested": {"x": [None, 2]}, "ok": True, "name": "a"}
    assert json_safe(record) == expected
    line = json_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line, parse_constant=_reject) == expected  # no bare NaN / Infinity tokens
    write_json_atomic(tmp_path / "r.json", record)
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=_reject) == expected


def _reject(token):
    raise ValueError(f"non-standard JSON token {token}")
