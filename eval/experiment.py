"""The whole DoPr comparison (`dopr experiment`): collect, train with periodic closed-loop evaluation, report.

Each entry of --optims is a configuration being compared: an optimizer, optionally with its own settings
after colons, e.g. `adamw:lr=1e-3,dopr-adamw:lr=1e-3,dopr-adamw:lr=1e-3:damping=0.3:stats=ema`
(lr, weight_decay, damping, damping_mode, stats, precond_every, conv; a configuration's settings override the
flags of the same name). DoPr
configurations are compared, paired, with that of their base optimizer at the same lr (else its first one), by
the task's primary metric (success; mean return for the locomotion tasks), on each run's final checkpoint and, with
eval_every below the training steps, also on its best evaluated one (dopr.eval.comparison).

Everything it makes lives under one folder (default out/experiment):

    demos/<task>-<n>.zarr                     demonstrations, shared by every run of a task
    runs/<task>-<policy>-<config>-s<seed>/    one training run, evaluated at every checkpoint
    report/report.md, *.png                   the TTF report over all runs
    table.md                                  success (return, for locomotion tasks) and validation loss per
                                              cell, paired comparisons, on final and best checkpoints

It is resumable: demonstrations are topped up to the requested count, finished runs (a ckpt-final
with a complete evaluation of the same protocol) are skipped, an interrupted run resumes from its latest
checkpoint, and an unfinished evaluation runs its missing episode seeds (never reused as final).
Interrupt it at any time and run the same command again. With --archive, the finished runs of a committed
archive (`dopr archive`) are not run again and the table reads them from there: a study goes on after its run
folders were lost with a machine.

With --backend ray the runs spread over a Ray cluster (a new local one, or --address's): each is a Ray task
running the same code on the same folder, so the results are the sequential runner's and resuming works the
same way; a run that crashes is reported and started again (--retries) while the others go on. The experiment
folder must then be one that every node sees (a shared filesystem), and every node needs this dopr installed.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dopr.eval.config import EvalConfig
from dopr.options import option, reuse
from dopr.train.config import CONV_FORMS, DAMPING_MODES, OPTIMIZERS, STAT_MODES, TrainConfig

# what a configuration may set after its optimizer's name; all but the first two are DoPr's
SETTINGS = ("lr", "weight_decay", "damping", "damping_mode", "stats", "precond_every", "conv")
ANY_OPTIMIZER_SETTINGS = {"lr", "weight_decay"}


@dataclass
class ExperimentConfig:
    # The built-in default is the small version README's main command runs (about 15 minutes on 2
    # cores): lift with few demonstrations, where closed-loop success is not saturated.
    tasks: list[str] = option(help="comma-separated tasks (default %(default)s)", default_factory=lambda: ["lift"])
    policies: list[str] = option(help="comma-separated policy kinds (default %(default)s)",
                                 default_factory=lambda: ["mlp"])
    optims: list[str] = option(
        help="configurations: optimizer names, each optionally with ':KEY=VALUE' settings (lr, weight_decay, "
             "damping, damping_mode, stats, precond_every, conv) (default %(default)s)",
        default_factory=lambda: ["dopr-adamw", "adamw"])
    seeds: int = option(3, "training seeds per cell, seed_offset .. seed_offset + seeds - 1 (default %(default)s)")
    seed_offset: int = option(0, "first training seed (keep tuning seeds apart from reporting seeds)")
    demos: int = option(20, "demonstrations per task (default %(default)s)")
    # covers recoveries
    demo_noise_std: float = option(0.1, "expert action noise while collecting; labels stay clean (default %(default)s)")
    # training steps per policy kind; the --steps flag sets one number for all
    steps: dict[str, int] = field(default_factory=lambda: {"mlp": 3000, "resmlp": 3000, "diffusion": 20000,
                                                           "flow": 20000})
    # closed-loop evaluation of every such checkpoint, next to its val loss
    eval_every: int = reuse(TrainConfig, "eval_every", 1000)
    eval_episodes: int = reuse(TrainConfig, "eval_episodes")  # the same episode seeds for every run
    horizon: int | None = option(None, "evaluation horizon (default: the task's)")
    compounding_episodes: int = option(
        20, "rollouts from demonstration start states for the compounding-error curve, 0 = none (default %(default)s)")
    workers: int = option(2, "simulator worker processes for collection and evaluation (default %(default)s)")
    lr: float | None = reuse(TrainConfig, "lr")
    weight_decay: float = reuse(TrainConfig, "weight_decay")
    damping: float | None = reuse(TrainConfig, "damping")
    damping_mode: str | None = reuse(TrainConfig, "damping_mode")
    stats: str | None = reuse(TrainConfig, "stats")
    precond_every: int | None = reuse(TrainConfig, "precond_every")
    conv: str | None = reuse(TrainConfig, "conv")
    batch_size: int = reuse(TrainConfig, "batch_size")
    down_dims: list[int] = reuse(TrainConfig, "down_dims")  # 32,64,128 trains in reasonable time on a CPU
    mlp_hidden_dim: int = reuse(TrainConfig, "mlp_hidden_dim")  # the Humanoid protocol's resmlp: 512 wide
    mlp_layers: int = reuse(TrainConfig, "mlp_layers")
    mlp_layer_norm: bool = reuse(TrainConfig, "mlp_layer_norm")
    norm_mode: str = reuse(TrainConfig, "norm_mode")  # the Humanoid protocol's: gaussian
    # torch threads per training process. One: the simulator workers and other jobs share the cores, and an
    # oversubscribed OpenMP pool is catastrophic (a 256x3 MLP step measured 13 ms on 1 thread, 470 ms on 2
    # threads with one other busy process on 2 cores).
    threads: int = reuse(TrainConfig, "threads", 1)
    eval_videos: int = reuse(TrainConfig, "eval_videos")
    wandb: bool = reuse(TrainConfig, "wandb")  # one wandb run per training run, grouped by the experiment folder
    wandb_project: str | None = reuse(TrainConfig, "wandb_project")
    wandb_mode: str | None = reuse(TrainConfig, "wandb_mode")
    device: str = reuse(TrainConfig, "device")
    # where the runs go; the local backend needs no Ray
    backend: str = option(
        "local", "local: one run after another in this process; ray: every run a Ray task with its CPUs (and GPU "
                 "with --device cuda) declared, on a new local Ray or the cluster at --address; needs the ray extra "
                 "(default %(default)s)", choices=("local", "ray"))
    address: str | None = reuse(EvalConfig, "address")
    max_parallel: int | None = option(
        None, "with --backend ray: runs at once at most (default: as many as the cluster's CPUs and GPUs hold)")
    retries: int = option(1, "with --backend ray: a run that crashed is started again this many times, from its "
                             "latest checkpoint, before it is reported failed (default %(default)s)")
    gpus_per_run: float = option(
        1.0, "with --backend ray and --device cuda: GPUs each run declares; a fraction lets small runs share one "
             "(default %(default)s)")
    out: str = option("out/experiment", "experiment folder (default %(default)s)")
    demos_dir: str | None = option(
        None, "folder of demonstration stores to share between experiments (default OUT/demos)")
    archive: str | None = option(
        None, "folder of finished runs copied by `dopr archive` (a committed study's): a run found finished there, "
              "with this experiment's settings, is not trained again, and the table and report read it from there; "
              "a study outlives the loss of its run folders")

    @classmethod
    def from_file(cls, path: str) -> "ExperimentConfig":
        """A JSON or TOML file whose keys are this dataclass's fields."""
        import tomllib

        with open(path, "rb") as f:
            raw = tomllib.load(f) if path.endswith(".toml") else json.load(f)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown experiment option(s) {unknown}; known: {sorted(known)}")
        if raw.get("down_dims", ...) is None:  # written by older versions for "the training default"
            raw.pop("down_dims")
        return cls(**raw)


@dataclass(frozen=True)
class Configuration:
    """One configuration being compared: "dopr-adamw:damping=0.3:lr=1e-3" is dopr-adamw with those settings;
    `name` is what reports and tables call it."""

    name: str
    optim: str
    settings: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Configuration":
        hints = typing.get_type_hints(TrainConfig)
        types_ = {key: (typing.get_args(hints[key]) or (hints[key],))[0] for key in SETTINGS}
        optim, *items = spec.split(":")
        if optim not in OPTIMIZERS:
            raise ValueError(f"--optims entry {spec!r}: unknown optimizer {optim!r}; choose from {list(OPTIMIZERS)}")
        settings = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in SETTINGS:
                raise ValueError(f"--optims entry {spec!r}: {item!r} is not KEY=VALUE with KEY one of {list(SETTINGS)}")
            if key in settings:
                raise ValueError(f"--optims entry {spec!r}: {key} given twice")
            allowed = {"stats": STAT_MODES, "damping_mode": DAMPING_MODES, "conv": CONV_FORMS}.get(key)
            if allowed is not None and value not in allowed:
                raise ValueError(f"--optims entry {spec!r}: {key}={value!r}; choose from {list(allowed)}")
            try:
                settings[key] = types_[key](value)
            except ValueError:
                raise ValueError(f"--optims entry {spec!r}: {key}={value!r} is not a {types_[key].__name__}") from None
        if not optim.startswith("dopr") and set(settings) - ANY_OPTIMIZER_SETTINGS:
            raise ValueError(f"--optims entry {spec!r}: {sorted(set(settings) - ANY_OPTIMIZER_SETTINGS)} only apply "
                             f"to dopr-* optimizers")
        return cls(spec, optim, tuple(settings.items()))

    @property
    def slug(self) -> str:
        """The name as a folder name: "dopr-adamw:damping=0.3" -> "dopr-adamw_damping0.3"."""
        return self.name.replace(":", "_").replace("=", "")

    def setting(self, key: str, default):
        return dict(self.settings).get(key, default)

@dataclass(frozen=True)
class Run:
    """One training run of the experiment: its cell and seed, and where it and its demonstrations live (absolute
    paths: a Ray task may start in another folder)."""

    task: str
    policy: str
    configuration: Configuration
    seed: int
    folder: str
    demos: str

    @property
    def name(self) -> str:
        return os.path.basename(self.folder)


def run_experiment(cfg: ExperimentConfig) -> str:
    """Runs what is missing of the experiment; returns the markdown table."""
    import sys
    from collections import Counter

    from dopr.envs import list_tasks
    from dopr.folder_lock import FolderLock
    from dopr.train import POLICY_KINDS

    for name, values, allowed in (("task", cfg.tasks, list_tasks()), ("policy", cfg.policies, POLICY_KINDS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    unset = [policy for policy in cfg.policies if policy not in cfg.steps]
    if unset:  # a config file's [steps] table names only the policies it sets
        raise ValueError(f"no training steps for policy {unset}: give --steps N (every policy) or set "
                         f"{', '.join(f'steps.{p}' for p in unset)} in the config file")
    configurations = [Configuration.parse(spec) for spec in cfg.optims]
    if cfg.eval_every < 1:  # training evaluates every run's final checkpoint: the table is made of those
        raise ValueError(f"--eval-every {cfg.eval_every}: an experiment evaluates its runs as they train; give at "
                         f"least 1 (the number of steps evaluates only the final checkpoint)")
    if cfg.wandb:  # a missing extra is said now, not after the collection
        from dopr.lazy import require

        require("wandb", "wandb", "--wandb")
    clash = sorted(slug for slug, n in Counter(c.slug for c in configurations).items() if n > 1)
    if clash:
        raise ValueError(f"--optims names the same configuration twice: {clash}")
    if cfg.backend == "ray":
        from dopr.eval.experiment_ray import check_ray_options

        check_ray_options(cfg)
    bars = sys.stderr.isatty()  # progress bars in a terminal; a log file gets the [experiment] lines
    out = Path(cfg.out).absolute()
    # one writer per study: a second `dopr experiment` on this folder would train the same runs at the same time
    with FolderLock.acquire(out, "dopr experiment"):
        return _run_missing(cfg, out, bars)


def planned_runs(cfg: ExperimentConfig) -> list[Run]:
    """Every run the experiment is made of (task x policy x configuration x seed), finished or not."""
    out = Path(cfg.out).absolute()
    demos = Path(cfg.demos_dir or out / "demos").absolute()
    return [Run(task, policy, config, seed, str(out / "runs" / f"{task}-{policy}-{config.slug}-s{seed}"),
                str(demos / f"{task}-{cfg.demos}.zarr"))
            for task in cfg.tasks for policy in cfg.policies for config in map(Configuration.parse, cfg.optims)
            for seed in range(cfg.seed_offset, cfg.seed_offset + cfg.seeds)]


def _run_missing(cfg: ExperimentConfig, out: Path, bars: bool) -> str:
    import contextlib
    import time

    from dopr.envs.collect import CollectConfig, collect
    from dopr.eval.comparison import cells_from_runs, comparison_table
    from dopr.eval.report import build_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    started = time.time()

    runs = planned_runs(cfg)
    archived = {run.name: folder for run in runs if (folder := archived_run(cfg, run))}
    if cfg.archive:
        print(f"[experiment] {len(archived)} of {len(runs)} runs found finished in {cfg.archive}: not run again",
              flush=True)
    to_run = [run for run in runs if run.name not in archived]
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if cfg.backend == "ray" and to_run:  # Ray starts while the demonstrations are collected
            from dopr.eval.experiment_ray import ray_starting, run_on_ray

            ray_ready = stack.enter_context(ray_starting(cfg, len(to_run)))
        # every task's demonstrations first (here, whatever the backend), then the runs, which only read them
        for task, store in {run.task: run.demos for run in to_run}.items():
            print(f"[experiment] {task}: {cfg.demos} demonstrations -> {store}", flush=True)
            collect(CollectConfig(task=task, n_episodes=cfg.demos, out=store, workers=cfg.workers,
                                  seed=0, noise_std=cfg.demo_noise_std, progress=bars))
        progress = RunProgress(len(to_run), bars)
        if cfg.backend == "ray" and to_run:
            failed = run_on_ray(cfg, ray_ready(), to_run, progress)
        else:
            for run in to_run:
                progress.finished(run.name, run_one(cfg, run, bars))
        progress.close()

    run_dirs = [archived.get(run.name, run.folder) for run in runs]
    cells = cells_from_runs(run_dirs)
    report_md = build_report(run_dirs, str(out / "report"), cells=cells)
    table = comparison_table(cells)
    minutes = (time.time() - started) / 60
    (out / "table.md").write_text(table + f"\n\nWall time of this invocation: {minutes:.1f} min.\n")
    print(f"[experiment] report: {report_md}; table: {out / 'table.md'} ({minutes:.1f} min)", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed after {cfg.retries + 1} attempt(s) each, "
                           f"the table and report leave them out: " +
                           "; ".join(f"{name}: {why.rstrip('.')}" for name, why in failed.items()) +
                           ". Run the same command again to go on from their latest checkpoints")
    return table


def train_config(cfg: ExperimentConfig, run: Run, resume: str | None = None, bars: bool = False) -> TrainConfig:
    """The `dopr train` configuration of one run: the experiment's settings, the configuration's own over them."""
    return TrainConfig(
        data=run.demos, out=run.folder, policy=run.policy, optim=run.configuration.optim,
        configuration=run.configuration.name, steps=cfg.steps[run.policy], seed=run.seed,
        batch_size=cfg.batch_size, down_dims=cfg.down_dims, mlp_hidden_dim=cfg.mlp_hidden_dim,
        mlp_layers=cfg.mlp_layers, mlp_layer_norm=cfg.mlp_layer_norm, norm_mode=cfg.norm_mode,
        threads=cfg.threads, device=cfg.device,
        # the configuration's own settings, else the experiment's flags of the same name
        **{key: run.configuration.setting(key, getattr(cfg, key)) for key in SETTINGS},
        val_every=cfg.eval_every, ckpt_every=cfg.eval_every,
        eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes, eval_workers=cfg.workers,
        eval_horizon=cfg.horizon, eval_videos=cfg.eval_videos, resume=resume, progress=bars,
        # one wandb run per training run, grouped by the experiment folder's name
        wandb=cfg.wandb, wandb_project=cfg.wandb_project, wandb_mode=cfg.wandb_mode,
        wandb_group=Path(cfg.out).absolute().name,
    )


# What an archived run must share with the run it stands for: all that shapes its training and evaluation. Paths,
# threads, device, logging and the number of evaluation workers may differ (they change speed, not results).
RUN_DEFINING = ("policy", "optim", "configuration", "steps", "seed", "batch_size", "down_dims", "mlp_hidden_dim",
                "mlp_layers", "mlp_layer_norm", "norm_mode", *SETTINGS, "val_every", "ckpt_every", "eval_every",
                "eval_episodes", "eval_horizon")


def archived_run(cfg: ExperimentConfig, run: Run) -> str | None:
    """The folder of cfg.archive that holds `run` finished, else None (not there, or its evaluation incomplete).
    A folder of the run's name trained with other settings is an error: it would be compared as this run."""
    from dopr.eval.runs import is_run_folder, read_json, read_run_record

    folder = os.path.join(cfg.archive, run.name) if cfg.archive else None
    if folder is None or not is_run_folder(folder) or not read_run_record(folder).finished:
        return None
    archived, wanted = read_json(os.path.join(folder, "config.json")), asdict(train_config(cfg, run))
    # a key this experiment leaves to training's default (None) is whatever training resolved it to
    differ = [f"{key} {archived.get(key)!r} here, {wanted[key]!r} in this experiment" for key in RUN_DEFINING
              if wanted[key] is not None and archived.get(key) != wanted[key]]
    if os.path.basename(str(archived.get("data", ""))) != os.path.basename(run.demos):
        differ.append(f"demonstrations {os.path.basename(str(archived.get('data')))!r} here, "
                      f"{os.path.basename(run.demos)!r} in this experiment")
    if differ:
        raise ValueError(f"--archive: {folder}/config.json is not this experiment's run {run.name}: "
                         + "; ".join(differ))
    return folder


def run_one(cfg: ExperimentConfig, run: Run, bars: bool = False) -> str:
    """Train (or resume) and evaluate one run, then its compounding-error curve; returns what it did.

    The same function in this process (local backend) and in a Ray task: all it keeps is in the run folder, so a
    run interrupted anywhere goes on from its latest checkpoint, and a finished one is reused (its final
    evaluation completed when interrupted), whichever process runs it next."""
    from dopr.atomic import read_jsonl
    from dopr.eval import EvalConfig, checkpoint_evaluation, evaluate_checkpoint, measure_compounding_error
    from dopr.eval.results import COMPOUNDING_FILE, EPISODES_FILE, read_episodes
    from dopr.policies.checkpoint import is_complete_checkpoint
    from dopr.train import train
    from dopr.train.metrics_log import logs_evaluation

    folder = Path(run.folder)
    final = folder / "ckpt-final"
    metrics = folder / "metrics.jsonl"
    if (is_complete_checkpoint(final) and metrics.exists()
            and logs_evaluation(read_jsonl(metrics), cfg.steps[run.policy])):
        # Trained, and its final evaluation logged (else training's resume finishes and logs it). The evaluation
        # training made (checkpoint_evaluation) is reused only when complete with this protocol; one begun with
        # fewer episodes runs the missing ones.
        result = evaluate_checkpoint(str(final), EvalConfig(
            episodes=cfg.eval_episodes, workers=cfg.workers, horizon=cfg.horizon, device=cfg.device, progress=bars))
        done = ("trained and evaluated, reused" if not result.timing["episodes_run"] else
                f"final checkpoint evaluated ({result.timing['episodes_run']} episodes run)")
    else:
        resume = "latest" if any(folder.glob("ckpt-*")) else None
        print(f"[experiment] {run.name}: {'resuming' if resume else 'training'}", flush=True)
        train_cfg = train_config(cfg, run, resume, bars)
        trained = is_complete_checkpoint(final)  # every step done: training only finishes the final evaluation
        before = len(read_episodes(str(final / "eval"))) if (final / "eval" / EPISODES_FILE).exists() else 0
        train(train_cfg, checkpoint_evaluation(train_cfg))
        done = (f"final checkpoint evaluated ({len(read_episodes(str(final / 'eval'))) - before} episodes run)"
                if trained else
                "resumed from its latest checkpoint, trained and evaluated" if resume else "trained and evaluated")
    # The compounding-error curve: the final policy from the demonstrations' start states,
    # its actions against the expert's labels in the states it reaches.
    if cfg.compounding_episodes and not (final / "eval" / COMPOUNDING_FILE).exists():
        print(f"[experiment] {run.name}: compounding-error curve", flush=True)
        episodes = min(cfg.compounding_episodes, cfg.demos)
        measure_compounding_error(str(final), run.demos, EvalConfig(
            episodes=episodes, workers=cfg.workers, horizon=cfg.horizon, device=cfg.device, progress=bars))
    return done


class RunProgress:
    """Runs done of all, with an ETA from the pace of the runs done here (those found finished and reused took no
    time): a tqdm bar in a terminal, and a line per finished run."""

    def __init__(self, total: int, bars: bool):
        import time

        from tqdm import tqdm

        self.total, self.done, self.reused, self.started = total, 0, 0, time.monotonic()
        self.bar = tqdm(total=total, desc="experiment", unit="run", disable=not bars)

    def finished(self, name: str, outcome: str) -> None:
        import time

        from tqdm import tqdm

        self.done += 1
        self.reused += outcome.endswith(", reused")  # found finished: no time spent, so no pace to go by
        self.bar.update(1)
        elapsed = time.monotonic() - self.started
        worked = self.done - self.reused
        eta = (tqdm.format_interval(elapsed / worked * (self.total - self.done)) if worked
               else "after the first run not reused")
        tqdm.write(f"[experiment] {name}: {outcome} ({self.done}/{self.total} runs done, "
                   f"{tqdm.format_interval(elapsed)} so far, ETA {eta})")

    def close(self) -> None:
        self.bar.close()
