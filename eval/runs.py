"""The typed record of a training run folder: one reader of config.json, meta.json and the results files.

    run = read_run_record("out/runs/lift-mlp-dopr-adamw-s0")
    run.configuration, run.policy, run.seed        # from config.json (written by dopr.train)
    for ckpt in run.checkpoints:                   # complete ckpt-* folders, in step order
    run.evaluated()                                # those with results.json, one per step
    run.finished                                   # ckpt-final's evaluation complete
        ckpt.meta.step, ckpt.meta.val_loss, ckpt.meta.task
        ckpt.results                               # eval/results.json, or None when not evaluated

The report, the comparison table and the experiment read runs only through this module, so a key
dopr writes is named here once and nothing guesses.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from dopr.eval.results import COMPOUNDING_FILE, EPISODES_FILE, RESULTS_FILE, EpisodeCount


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (is {os.path.dirname(path)} a complete dopr run or checkpoint "
                                f"folder?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt JSON ({err})") from None


@dataclass
class CheckpointMeta:
    """meta.json of a checkpoint (dopr.train.checkpointing.checkpoint_meta writes it)."""

    step: int
    val_loss: float | None
    task: str | None
    control_freq: float | None
    obs_shapes: dict

    @classmethod
    def read(cls, ckpt_dir: str) -> "CheckpointMeta":
        path = os.path.join(ckpt_dir, "meta.json")
        meta = read_json(path)
        if "step" not in meta:
            raise ValueError(f"{path}: no 'step'; not a checkpoint written by dopr train")
        val_loss = meta.get("val_loss")
        val_loss = None if val_loss is None or math.isnan(float(val_loss)) else float(val_loss)
        return cls(step=int(meta["step"]), val_loss=val_loss,
                   task=meta.get("task"), control_freq=meta.get("control_freq"),
                   obs_shapes=meta.get("obs_shapes") or {})


@dataclass
class CheckpointRecord:
    path: str
    name: str  # ckpt-0001000 or ckpt-final
    meta: CheckpointMeta

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.path, "eval")

    @property
    def results(self) -> dict | None:
        """eval/results.json (dopr eval), or None when the checkpoint was not evaluated."""
        path = os.path.join(self.eval_dir, RESULTS_FILE)
        return read_json(path) if os.path.isfile(path) else None

    @property
    def compounding_error(self) -> dict | None:
        path = os.path.join(self.eval_dir, COMPOUNDING_FILE)
        return read_json(path) if os.path.isfile(path) else None

    def episodes(self) -> list[dict]:
        from dopr.atomic import read_jsonl

        return read_jsonl(os.path.join(self.eval_dir, EPISODES_FILE))


@dataclass
class RunRecord:
    """A `dopr train` run folder: its configuration (config.json) and its complete checkpoints."""

    path: str
    configuration: str  # the compared configuration's name (e.g. "dopr-adamw:damping=0.3"), else the optimizer
    optim: str  # dopr.optim.build's name
    policy: str
    seed: int
    lr: float | None
    checkpoints: list[CheckpointRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def final(self) -> CheckpointRecord | None:
        return next((c for c in self.checkpoints if c.name == "ckpt-final"), None)

    @property
    def finished(self) -> bool:
        """Trained, and ckpt-final's evaluation complete. An evaluation writes an incomplete results.json when it
        starts, so "ckpt-final has results.json" is not enough."""
        results = self.final.results if self.final is not None else None
        return results is not None and EpisodeCount.of(results).complete

    def evaluated(self) -> list[CheckpointRecord]:
        """The checkpoints with an evaluation (results.json), one per training step, in step order. ckpt-final
        repeats the last numbered step; where both were evaluated, ckpt-final stands for it (it is what a final
        checkpoint's numbers are read from)."""
        by_step = {}
        for ckpt in self.checkpoints:  # in step order, ckpt-final after a numbered one of its step
            if ckpt.results is not None:
                by_step[ckpt.meta.step] = ckpt
        return list(by_step.values())

    @property
    def task(self) -> str | None:
        return next((c.meta.task for c in self.checkpoints if c.meta.task), None)

    def metrics(self) -> list[dict]:
        """metrics.jsonl, whatever a kill left of it (an empty list when there is none)."""
        from dopr.atomic import read_jsonl

        path = os.path.join(self.path, "metrics.jsonl")
        return read_jsonl(path) if os.path.isfile(path) else []


def is_run_folder(path: str) -> bool:
    """Whether `path` holds a `dopr train` run (its config.json); a folder training has not reached yet does not."""
    return os.path.isfile(os.path.join(path, "config.json"))


def read_run_record(run_dir: str) -> RunRecord:
    """The run folder's record; a folder without config.json is not a `dopr train` run (ValueError)."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not is_run_folder(run_dir):
        raise ValueError(f"{run_dir}: no config.json; not a run folder written by dopr train")
    cfg = read_json(cfg_path)
    missing = [k for k in ("optim", "policy", "seed") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path}: no {missing}; not a config written by dopr train")
    # runs written before the compared configuration had one name called it "label"
    configuration = cfg.get("configuration") or cfg.get("label") or cfg["optim"]
    record = RunRecord(path=run_dir, configuration=str(configuration), optim=cfg["optim"], policy=cfg["policy"],
                       seed=cfg["seed"], lr=cfg.get("lr"))
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith("ckpt-") and os.path.isfile(os.path.join(path, "meta.json")):  # else temporary
            record.checkpoints.append(CheckpointRecord(path, name, CheckpointMeta.read(path)))
    record.checkpoints.sort(key=lambda c: (c.meta.step, c.name == "ckpt-final"))
    return record


def record_files(record: RunRecord) -> list[str]:
    """The files of a run folder this module reads, relative to it: what a study's numbers are made of, without the
    checkpoints' weights and the videos (megabytes per run, where these are kilobytes). A copy of them is read by
    the report, the comparison table and the tuning rule exactly as the run folder is (`dopr archive`)."""
    wanted = ["config.json", "metrics.jsonl"]
    for ckpt in record.checkpoints:
        wanted += [os.path.join(ckpt.name, "meta.json")]
        wanted += [os.path.join(ckpt.name, "eval", name) for name in (RESULTS_FILE, EPISODES_FILE, COMPOUNDING_FILE)]
    return [name for name in wanted if os.path.isfile(os.path.join(record.path, name))]
