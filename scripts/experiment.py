"""`dopr experiment`: collect, train with periodic closed-loop evaluation, and report, in one command
(dopr.eval.experiment; its options are ExperimentConfig's fields, several of them TrainConfig's)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from dopr.eval.experiment import ExperimentConfig
from dopr.eval.experiment import __doc__ as EXPERIMENT_DOC
from dopr.options import add_options, from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="collect, train with periodic evaluation, and report: the whole DoPr comparison",
        description=EXPERIMENT_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="JSON or TOML file with the options below (flags given here override it)")
    d = ExperimentConfig()
    p.add_argument("--steps", type=int, help="training steps for every policy (default: " +
                   ", ".join(f"{k} {v}" for k, v in d.steps.items()) + ")")
    # absent flags stay absent, so the --config file's values stand
    add_options(p, ExperimentConfig, suppress_defaults=True)
    p.set_defaults(func=main)


def config_from_args(args) -> ExperimentConfig:
    cfg = ExperimentConfig()
    if args.config:
        try:
            cfg = ExperimentConfig.from_file(args.config)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"{args.config}: not a valid {Path(args.config).suffix.lstrip('.') or 'JSON'} "
                             f"file ({err})") from None
        except TypeError as err:  # a value of the wrong kind: ExperimentConfig(**raw)
            raise ValueError(f"{args.config}: {err}") from None
    if args.steps is not None:
        cfg.steps = {k: args.steps for k in cfg.steps}
    return from_args(ExperimentConfig, args, base=cfg)


def main(args) -> int:
    import sys

    from dopr.eval.experiment import run_experiment
    from dopr.policies import CheckpointError
    from dopr.scripts.errors import USER_ERRORS, user_error

    try:
        table = run_experiment(config_from_args(args))
    except KeyboardInterrupt as err:
        print(f"\ndopr experiment: interrupted ({err or 'Ctrl-C'}); run the same command again to go on from here",
              file=sys.stderr)
        return 130
    # bad options, config file, task or data; a collection that fell short (RuntimeError, as `dopr collect`'s),
    # a checkpoint that does not load, DoPr's non-finite step
    except (*USER_ERRORS, RuntimeError, CheckpointError, FloatingPointError) as err:
        return user_error("experiment", err)
    print(table)
    return 0
