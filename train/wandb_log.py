"""Weights & Biases (`--wandb`): the metrics.jsonl records, and the evaluation videos, of a run.

An optional extra (pip install -e ".[wandb]"), imported only when --wandb is given. WANDB_PROJECT, WANDB_MODE
(online, offline, disabled), WANDB_DIR and the rest of wandb's environment variables apply as usual; the
flags, when given, take precedence.

The run's id is kept in <run folder>/wandb.json, so a resumed training (--resume) logs into the same wandb
run. Steps a killed run logged after its last checkpoint are logged again on resume with the same values
(the resume is deterministic); wandb keeps the first.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from dopr.atomic import write_json_atomic
from dopr.lazy import require

ID_FILE = "wandb.json"


class WandbLog:
    """One wandb run per training run folder."""

    def __init__(self, run_dir: Path, config: dict, project: str | None = None, name: str | None = None,
                 group: str | None = None, mode: str | None = None):
        wandb = require("wandb", "wandb", "--wandb")
        self.wandb = wandb
        id_path = Path(run_dir) / ID_FILE
        if id_path.exists():  # this folder's run, begun before: go on with it
            run_id = json.loads(id_path.read_text())["id"]
        else:
            run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as wandb's own ids
            write_json_atomic(id_path, {"id": run_id})  # before the run starts, so a kill at any point keeps it
        self.run = wandb.init(
            id=run_id, resume="allow", name=name or Path(run_dir).resolve().name, group=group,
            project=project or os.environ.get("WANDB_PROJECT") or "dopr", mode=mode,  # None: $WANDB_MODE
            dir=os.environ.get("WANDB_DIR"))
        # after init, allowing changes: a resumed run may change what RESUME_MAY_CHANGE lists (e.g. eval_every)
        self.run.config.update(config, allow_val_change=True)

    def log(self, record: dict) -> None:
        """A metrics.jsonl record at its step: its numbers (a NaN loss as NaN), and its evaluation's videos
        (`eval_videos`, mp4 paths) as eval_video_0, eval_video_1, ..."""
        data = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for i, path in enumerate(record.get("eval_videos") or ()):
            data[f"eval_video_{i}"] = self.wandb.Video(path, format="mp4")
        self.run.log(data, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
