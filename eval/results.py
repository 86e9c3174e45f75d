"""What an evaluation leaves on disk, and how it is written without ever leaving half a file.

<out_dir>/results.json     summary + protocol (checkpoint, task, seeds, horizon, init, versions) and how many
                           episodes were asked (`episodes_requested`) and done (`n_episodes`, `complete`),
                           written atomically (temp file, then rename) at the start (incomplete, so a killed
                           evaluation still says what it was), at the end and on Ctrl-C
<out_dir>/episodes.jsonl   one line per finished episode, appended (and flushed) as it finishes,
                           so an interrupted evaluation keeps every finished episode and a re-run of the
                           same protocol runs only the missing episode seeds (dopr.eval.evaluator)
<out_dir>/videos/          episode_XXXX.mp4 of the first K episodes
By default out_dir is <checkpoint>/eval.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata

from dopr.atomic import json_default, read_jsonl, write_text_atomic

RESULTS_FILE = "results.json"
EPISODES_FILE = "episodes.jsonl"
COMPOUNDING_FILE = "compounding_error.json"


@dataclass
class EvalResult:
    task: str
    n_episodes: int
    n_success: int
    success_rate: float
    ci_low: float  # 95% Wilson interval of the success rate
    ci_high: float
    mean_return: float
    return_ci_low: float  # 95% t interval of the mean return
    return_ci_high: float
    mean_length: float
    time_to_success: float | None  # mean control steps to the first success, successful episodes only
    n_errors: int  # episodes lost to a worker fault (counted as failures)
    protocol: dict = field(default_factory=dict)  # checkpoint, seeds, horizon, init, versions, ...
    timing: dict = field(default_factory=dict)  # wall_s, env_steps_per_s, policy_ms_per_call, ...
    interrupted: bool = False
    episodes_requested: int = 0  # the episodes asked for; n_episodes of them are done
    complete: bool = False  # every requested episode is done: only then is the result final
    episodes: list[dict] = field(default_factory=list)  # per-episode records, in episode order
    out_dir: str | None = None
    action_errors: dict = field(default_factory=dict)  # episode -> |action - expert label| per step

    def summary(self) -> dict:
        """What results.json holds: everything but the per-episode lists."""
        d = asdict(self)
        d.pop("episodes")
        d.pop("action_errors")
        return d

    def describe(self) -> str:
        partial = "" if self.complete else f" INCOMPLETE: {self.n_episodes} of {self.episodes_requested} episodes,"
        tts = "-" if self.time_to_success is None else f"{self.time_to_success:.1f}"
        return (f"{self.task}:{partial} success {self.n_success}/{self.n_episodes} = {self.success_rate:.3f} "
                f"(95% CI {self.ci_low:.3f}-{self.ci_high:.3f}), mean return {self.mean_return:.3f} "
                f"(95% t CI {self.return_ci_low:.3f} to {self.return_ci_high:.3f}), "
                f"mean length {self.mean_length:.1f}, time to success {tts}, worker faults {self.n_errors}")


@dataclass(frozen=True)
class EpisodeCount:
    """How many episodes a results.json asked for and how many are done; files written before
    `episodes_requested` existed say it as protocol["episodes"]."""

    done: int
    requested: int

    @classmethod
    def of(cls, summary: dict) -> "EpisodeCount":
        done = int(summary["n_episodes"])
        requested = summary.get("episodes_requested") or (summary.get("protocol") or {}).get("episodes") or done
        return cls(done, int(requested))

    @property
    def complete(self) -> bool:
        return self.done >= self.requested

    def __str__(self) -> str:
        return f"{self.done}" if self.complete else f"{self.done} of {self.requested} (incomplete)"


class EpisodeLog:
    """episodes.jsonl, appended one line per finished episode; it starts as the finished episodes an
    evaluation keeps (none when it starts over), written in episode order."""

    def __init__(self, path: str | None, kept: list[dict] = ()):
        self.path = path
        self._f = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.rewrite_sorted(list(kept))  # also drops a line a kill cut short
            self._f = open(path, "a")

    def append(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, default=json_default) + "\n")
            self._f.flush()

    def rewrite_sorted(self, records: list[dict]) -> None:
        """At the end, replace the file (atomically) by the records in episode order."""
        if self.path is None:
            return
        self.close()
        write_text_atomic(self.path, "".join(json.dumps(r, default=json_default) + "\n"
                                             for r in sorted(records, key=lambda r: r["episode"])))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_episodes(path: str) -> list[dict]:
    """Episodes of episodes.jsonl (or of an evaluation folder holding one); a torn last line
    (process killed mid-write) is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, EPISODES_FILE)
    return read_jsonl(path)


def library_versions() -> dict:
    """Versions of what decides a rollout, read from package metadata (no heavy imports)."""
    versions = {"python": sys.version.split()[0]}
    for pkg in ("dopr", "torch", "mujoco", "robosuite", "gymnasium", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions
