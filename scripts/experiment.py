"""`dopr experiment`: collect, train with periodic closed-loop evaluation, and report, in one command.

Each entry of --optims is an arm of the comparison: an optimizer, optionally with its own settings
after colons, e.g. `adamw:lr=1e-3,dopr-adamw:lr=1e-3,dopr-adamw:lr=1e-3:damping=0.3:stats=ema`
(lr, damping, stats, precond_every; an arm's settings override the flags of the same name). DoPr arms
are compared, paired, with the arm of their base optimizer at the same lr (else its first arm).

Everything it makes lives under one folder (default out/experiment):

    demos/<task>-<n>.zarr                     demonstrations, shared by every run of a task
    runs/<task>-<policy>-<arm>-s<seed>/       one training run, evaluated at every checkpoint
    report/report.md, *.png                   the TTF report over all runs
    table.md                                  success and validation loss per cell, paired comparisons

It is resumable: demonstrations are topped up to the requested count, finished runs (a ckpt-final
with evaluation results) are skipped, an interrupted run resumes from its latest checkpoint, and a
final checkpoint without results is evaluated. Interrupt it at any time and run the same command again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class ExperimentConfig:
    # The built-in default is the small version README's main command runs (about 15 minutes on 2
    # cores): lift with few demonstrations, where closed-loop success is not saturated.
    tasks: list[str] = field(default_factory=lambda: ["lift"])
    policies: list[str] = field(default_factory=lambda: ["mlp"])
    optims: list[str] = field(default_factory=lambda: ["dopr-adamw", "adamw"])
    seeds: int = 3  # training seeds seed_offset .. seed_offset + seeds - 1
    seed_offset: int = 0
    demos: int = 20  # demonstrations per task
    demo_noise_std: float = 0.1  # expert action noise while collecting (labels stay clean): covers recoveries
    steps: dict[str, int] = field(default_factory=lambda: {"mlp": 3000, "diffusion": 20000, "flow": 20000})
    eval_every: int = 1000  # closed-loop evaluation of every such checkpoint, next to its val loss
    eval_episodes: int = 50  # the same episode seeds for every run
    horizon: int | None = None  # evaluation horizon; None: the task's (robomimic's) horizon
    compounding_episodes: int = 20  # rollouts from demonstration start states for the compounding-error curve
    workers: int = 2  # simulator processes for collection and evaluation
    lr: float | None = None  # None: the training default of each policy
    damping: float | None = None  # DoPr's gamma; None: the optimizer's default
    stats: str | None = None  # DoPr's statistics, "batch" or "ema"; None: the optimizer's default
    precond_every: int | None = None  # DoPr's refresh period; None: the optimizer's default
    batch_size: int = 256
    down_dims: list[int] | None = None  # the diffusion/flow UNet's channels; None: the training default (256, 512, 1024)
    # torch threads per training process. One: the simulator workers and other jobs share the cores, and an
    # oversubscribed OpenMP pool is catastrophic (a 256x3 MLP step measured 13 ms on 1 thread, 470 ms on 2
    # threads with one other busy process on 2 cores).
    threads: int = 1
    out: str = "out/experiment"
    demos_dir: str | None = None  # where demonstrations live; None: <out>/demos (share it between experiments)

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
        return cls(**raw)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


ARM_SETTINGS = {"lr": float, "damping": float, "stats": str, "precond_every": int}


@dataclass(frozen=True)
class Arm:
    """One configuration being compared: "dopr-adamw:damping=0.3:lr=1e-3" is dopr-adamw with those settings."""

    label: str
    optim: str
    settings: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Arm":
        from dopr.scripts.train import OPTIMIZERS

        optim, *items = spec.split(":")
        if optim not in OPTIMIZERS:
            raise ValueError(f"--optims entry {spec!r}: unknown optimizer {optim!r}; choose from {list(OPTIMIZERS)}")
        settings = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in ARM_SETTINGS:
                raise ValueError(f"--optims entry {spec!r}: {item!r} is not KEY=VALUE with KEY one of {list(ARM_SETTINGS)}")
            if key in settings:
                raise ValueError(f"--optims entry {spec!r}: {key} given twice")
            try:
                settings[key] = ARM_SETTINGS[key](value)
            except ValueError:
                raise ValueError(f"--optims entry {spec!r}: {key}={value!r} is not a {ARM_SETTINGS[key].__name__}") from None
        if not optim.startswith("dopr") and set(settings) - {"lr"}:
            raise ValueError(f"--optims entry {spec!r}: {sorted(set(settings) - {'lr'})} only apply to dopr-* optimizers")
        return cls(spec, optim, tuple(settings.items()))

    @property
    def slug(self) -> str:
        """The label as a folder name: "dopr-adamw:damping=0.3" -> "dopr-adamw_damping0.3"."""
        return self.label.replace(":", "_").replace("=", "")

    def setting(self, key: str, default):
        return dict(self.settings).get(key, default)


def add_parser(sub) -> None:
    d = ExperimentConfig()
    p = sub.add_parser(
        "experiment",
        help="collect, train with periodic evaluation, and report: the whole DoPr comparison",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="JSON or TOML file with the options below (flags given here override it)")
    p.add_argument("--tasks", type=_csv, help=f"comma-separated tasks (default {','.join(d.tasks)})")
    p.add_argument("--policies", type=_csv, help=f"mlp, diffusion, flow (default {','.join(d.policies)})")
    p.add_argument("--optims", type=_csv, help="arms: dopr-adamw, dopr-muon, adamw, muon, each optionally with "
                   f"':KEY=VALUE' settings (lr, damping, stats, precond_every) (default {','.join(d.optims)})")
    p.add_argument("--seeds", type=int, help=f"training seeds per cell (default {d.seeds})")
    p.add_argument("--seed-offset", type=int, help="first training seed (keep tuning seeds apart from reporting seeds)")
    p.add_argument("--demos", type=int, help=f"demonstrations per task (default {d.demos})")
    p.add_argument("--demo-noise-std", type=float, help=f"expert action noise while collecting (default {d.demo_noise_std})")
    p.add_argument("--steps", type=int, help="training steps for every policy (default: " +
                   ", ".join(f"{k} {v}" for k, v in d.steps.items()) + ")")
    p.add_argument("--eval-every", type=int, help=f"evaluate every K steps (default {d.eval_every})")
    p.add_argument("--eval-episodes", type=int, help=f"episodes per evaluation (default {d.eval_episodes})")
    p.add_argument("--horizon", type=int, help="evaluation horizon (default: the task's)")
    p.add_argument("--compounding-episodes", type=int,
                   help=f"rollouts from demonstration start states for the compounding-error curve, 0 = none "
                        f"(default {d.compounding_episodes})")
    p.add_argument("--workers", type=int, help=f"simulator worker processes (default {d.workers})")
    p.add_argument("--lr", type=float, help="learning rate for every run (default: each policy's)")
    p.add_argument("--damping", type=float, help="DoPr's gamma (default: the optimizer's)")
    p.add_argument("--stats", choices=("batch", "ema"), help="DoPr's input statistics (default: the optimizer's)")
    p.add_argument("--precond-every", type=int, help="DoPr's factorization refresh period (default: the optimizer's)")
    p.add_argument("--batch-size", type=int, help=f"training batch size (default {d.batch_size})")
    p.add_argument("--down-dims", type=lambda s: [int(x) for x in _csv(s)],
                   help="diffusion/flow UNet channels, e.g. 32,64,128 for CPU (default: training's 256,512,1024)")
    p.add_argument("--threads", type=int, help=f"torch threads per training process (default {d.threads})")
    p.add_argument("--out", help=f"experiment folder (default {d.out})")
    p.add_argument("--demos-dir", help="folder of demonstration stores to share between experiments (default OUT/demos)")
    p.set_defaults(func=main)


def config_from_args(args) -> ExperimentConfig:
    cfg = ExperimentConfig.from_file(args.config) if args.config else ExperimentConfig()
    for f in fields(ExperimentConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "steps":
            value = {k: value for k in cfg.steps}
        setattr(cfg, f.name, value)
    return cfg


def run_experiment(cfg: ExperimentConfig) -> str:
    """Runs what is missing of the experiment; returns the markdown table."""
    import sys
    import time
    from collections import Counter
    from pathlib import Path

    from dopr.envs import list_tasks
    from dopr.envs.collect import CollectConfig, collect
    from dopr.eval import evaluate_checkpoint, measure_compounding_error
    from dopr.eval.comparison import cells_from_runs, comparison_table
    from dopr.eval.report import build_report
    from dopr.eval.results import COMPOUNDING_FILE, RESULTS_FILE
    from dopr.scripts.train import POLICIES, TrainConfig, train

    for name, values, allowed in (("task", cfg.tasks, list_tasks()), ("policy", cfg.policies, POLICIES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    arms = [Arm.parse(spec) for spec in cfg.optims]
    clash = sorted(slug for slug, n in Counter(a.slug for a in arms).items() if n > 1)
    if clash:
        raise ValueError(f"--optims names the same arm twice: {clash}")
    bars = sys.stderr.isatty()  # progress bars in a terminal; a log file gets the [experiment] lines
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    started = time.time()

    run_dirs = []
    for task in cfg.tasks:
        demos = Path(cfg.demos_dir or out / "demos") / f"{task}-{cfg.demos}.zarr"
        print(f"[experiment] {task}: {cfg.demos} demonstrations -> {demos}", flush=True)
        collect(CollectConfig(task=task, n_episodes=cfg.demos, out=str(demos), workers=cfg.workers,
                              seed=0, noise_std=cfg.demo_noise_std, progress=bars))
        for policy in cfg.policies:
            for arm in arms:
                for seed in range(cfg.seed_offset, cfg.seed_offset + cfg.seeds):
                    run = out / "runs" / f"{task}-{policy}-{arm.slug}-s{seed}"
                    run_dirs.append(str(run))
                    final = run / "ckpt-final"
                    if (final / "eval" / RESULTS_FILE).exists():
                        print(f"[experiment] {run.name}: trained and evaluated, reused", flush=True)
                    elif final.exists():
                        print(f"[experiment] {run.name}: evaluating the final checkpoint", flush=True)
                        evaluate_checkpoint(str(final), episodes=cfg.eval_episodes, workers=cfg.workers,
                                            horizon=cfg.horizon, progress=bars)
                    else:
                        resume = "latest" if any(run.glob("ckpt-*")) else None
                        print(f"[experiment] {run.name}: {'resuming' if resume else 'training'}", flush=True)
                        train(TrainConfig(
                            data=str(demos), out=str(run), policy=policy, optim=arm.optim, label=arm.label,
                            steps=cfg.steps[policy], seed=seed, batch_size=cfg.batch_size,
                            # the arm's own settings, else the experiment's flags of the same name
                            **{key: arm.setting(key, getattr(cfg, key)) for key in ARM_SETTINGS},
                            **({"down_dims": cfg.down_dims} if cfg.down_dims else {}),
                            threads=cfg.threads, val_every=cfg.eval_every, ckpt_every=cfg.eval_every,
                            eval_every=cfg.eval_every, eval_episodes=cfg.eval_episodes, eval_workers=cfg.workers,
                            eval_horizon=cfg.horizon, resume=resume, progress=bars,
                        ))
                    # The compounding-error curve: the final policy from the demonstrations' start states,
                    # its actions against the expert's labels in the states it reaches.
                    if cfg.compounding_episodes and not (final / "eval" / COMPOUNDING_FILE).exists():
                        print(f"[experiment] {run.name}: compounding-error curve", flush=True)
                        measure_compounding_error(str(final), str(demos), episodes=min(cfg.compounding_episodes, cfg.demos),
                                                  workers=cfg.workers, horizon=cfg.horizon, progress=bars)

    cells = cells_from_runs(run_dirs)
    report_md = build_report(run_dirs, str(out / "report"), cells=cells)
    table = comparison_table(cells)
    minutes = (time.time() - started) / 60
    (out / "table.md").write_text(table + f"\n\nWall time of this invocation: {minutes:.1f} min.\n")
    print(f"[experiment] report: {report_md}; table: {out / 'table.md'} ({minutes:.1f} min)", flush=True)
    return table


def main(args) -> int:
    table = run_experiment(config_from_args(args))
    print(table)
    return 0
