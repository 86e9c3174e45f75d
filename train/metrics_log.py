"""metrics.jsonl, TensorBoard and optionally wandb: one record per logged step, and the throughput window it reports."""

from __future__ import annotations

import time
from pathlib import Path

from dopr.atomic import json_line, read_jsonl, write_text_atomic


def logs_evaluation(records: list[dict], step: int) -> bool:
    """Whether metrics.jsonl's records hold the closed-loop evaluation of `step`'s checkpoint: written in one line
    after the evaluation ends, so a kill during the evaluation leaves it out."""
    return any(r.get("step") == step and "eval_success_rate" in r for r in records)


class MetricsLog:
    """metrics.jsonl (flushed per line), TensorBoard, and wandb when given one (dopr.train.wandb_log). On resume,
    lines after the resumed step (and a line cut by a kill) are dropped, so the file reads as one run."""

    def __init__(self, run_dir: Path, start_step: int, wandb=None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [rec for rec in read_jsonl(self.path) if rec.get("step", 0) <= start_step]
        write_text_atomic(self.path, "".join(map(json_line, kept)))
        self.kept = kept  # the records of the run up to the resumed step
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.wandb = wandb

    def write(self, record: dict) -> None:
        self.file.write(json_line(record))  # strict JSON: a NaN loss is written as null
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(record)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


class ThroughputWindow:
    """Mean training loss, steps/s and the data loader's share of the time since the last logged step.
    Validation and evaluation are not training throughput: `pause_ended()` restarts the clock after them."""

    def __init__(self):
        self.loss_sum, self.data_s, self.steps, self.start = 0.0, 0.0, 0, time.perf_counter()

    def add(self, loss, data_s: float) -> None:
        self.loss_sum += loss.detach().float()  # a tensor: no device sync per step
        self.data_s += data_s
        self.steps += 1

    def pause_ended(self) -> None:
        self.start = time.perf_counter()

    def take(self) -> dict:
        """The window's record; a new window begins."""
        elapsed = time.perf_counter() - self.start
        record = {"train_loss": float(self.loss_sum) / self.steps, "steps_per_s": self.steps / elapsed,
                  "data_frac": self.data_s / elapsed}
        self.__init__()
        return record
