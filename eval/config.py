"""`EvalConfig`: every closed-loop evaluation option, declared once with its help text (`dopr eval`'s
command line is generated from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dopr.options import option

DEFAULT_SEED_BASE = 100_000  # far from the seeds demonstrations are collected with (0, 1, ...)


@dataclass
class EvalConfig:
    episodes: int = option(50, "number of episodes (default %(default)s)")
    workers: int = option(1, "simulator worker processes, or Ray actors with --backend ray (default %(default)s)")
    backend: str = option("local", "where the simulators run: local worker processes, or Ray actors (one "
                                   "simulator each, on a new local Ray or the cluster at --address; needs the "
                                   "ray extra) (default %(default)s)", choices=("local", "ray"))
    address: str | None = option(None, "with --backend ray: the Ray cluster to join, auto (the one `ray start` "
                                       "made on this machine) or HOST:PORT (default: start a local Ray)")
    device: str = option("cpu", "device the policy runs on: cpu, cuda, cuda:1 (default %(default)s)")
    seed_base: int = option(DEFAULT_SEED_BASE, "episode i uses seed SEED_BASE+i (default %(default)s)")
    horizon: int | None = option(None, "episode length limit (default: the task's horizon)")
    init: str = option("random", "initial states: seeded random (default) or the demonstrations' first states "
                                 "(needs --demos)", choices=("random", "demos"))
    demos: str | None = option(None, "episode store (.zarr) for --init demos, --horizon-mult and --compounding-error")
    n_action_steps: int | None = option(None, "actions executed per policy call, at most the policy's Ta (default Ta); "
                                              "with --temporal-ensemble, the length of the chunks blended")
    temporal_ensemble: float | None = option(
        None, "ACT's temporal ensembling with decay M: the policy runs at every control step and the action executed "
              "is the mean of what every chunk still covering this step predicted for it, weighted exp(-M j) with "
              "j = 0 the oldest (M = 0: the plain mean; ACT used 0.01). A protocol of its own in results.json "
              "(default: off, receding horizon)")
    videos: int = option(0, "write mp4 videos of the first K episodes (default %(default)s); needs offscreen "
                            "rendering (MUJOCO_GL=egl on a GPU machine, libosmesa6 on a CPU one) and refuses "
                            "at once without it")
    episode_timeout_s: float = option(
        600.0, "seconds an episode may take before its worker counts as hung and is restarted (default %(default)s)",
        flags=("--episode-timeout",))
    progress: bool = option(True, "no progress bar", flags=("--quiet",))
    # not on the command line: set by the callers that need them
    stop_on_success: bool = True  # end an episode at its first success
    label_with_expert: bool = False  # the task's expert labels every state reached (compounding error)
    # Policy batches are padded to this many rows: CPU matrix kernels sum tiny batches in another order
    # (measured: batch 1-3 vs >= 4 differ in the last float32 bit), so without padding an episode's actions
    # would depend on how many episodes share its batch, i.e. on the worker count.
    pad_batch: int = 8

    def __post_init__(self):
        if self.init not in ("random", "demos"):
            raise ValueError(f"init must be 'random' or 'demos', got {self.init!r}")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1 (simulator processes), got {self.workers}")
        if self.temporal_ensemble is not None and not math.isfinite(self.temporal_ensemble):
            raise ValueError(f"temporal_ensemble must be a finite decay, got {self.temporal_ensemble}")
        if self.init == "demos" and self.demos is None:
            raise ValueError("init='demos' needs demos=<path to an EpisodeStore> (--demos STORE.zarr)")
