"""`dopr train`: behavior cloning from an episode store, one process or several (torchrun).

    dopr train --data out/demos/lift.zarr --policy flow --optim dopr-adamw --steps 20000 --out out/runs/lift-flow
    torchrun --nproc_per_node=2 -m dopr.scripts.train --data ... --out ...

The options are TrainConfig's fields (dopr.train.config); the loop is dopr.train.loop.
"""

from __future__ import annotations

import argparse
import sys

from dopr.options import add_options, from_args
from dopr.train.config import TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy (mlp, diffusion, flow) on an episode store",
        description="Behavior cloning from an episode store. Writes config.json, metrics.jsonl, tb/ and "
        "checkpoints ckpt-<step>/ and ckpt-final/ into --out. Several processes: "
        "`torchrun --nproc_per_node=N -m dopr.scripts.train ...`.",
    )
    add_options(p, TrainConfig)
    p.set_defaults(func=main)


def main(args) -> int:
    from dopr.train.loop import train

    cfg = from_args(TrainConfig, args)
    evaluate = None
    if cfg.eval_every:
        from dopr.eval import checkpoint_success_rate

        evaluate = checkpoint_success_rate(cfg)
    train(cfg, evaluate)
    return 0


if __name__ == "__main__":  # torchrun -m dopr.scripts.train ...
    parser = argparse.ArgumentParser(prog="python -m dopr.scripts.train",
                                     description="dopr train (see `dopr train --help`)")
    add_options(parser, TrainConfig)
    sys.exit(main(parser.parse_args()))
