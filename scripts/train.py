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
    import os

    from dopr.policies import CheckpointError, load_checkpoint_meta
    from dopr.scripts.errors import USER_ERRORS, user_error
    from dopr.train.loop import train

    try:
        cfg = from_args(TrainConfig, args)
        evaluate = None
        if cfg.eval_every:
            from dopr.eval import checkpoint_evaluation

            evaluate = checkpoint_evaluation(cfg)
        final = train(cfg, evaluate)
    except KeyboardInterrupt:
        print(f"\ndopr train: interrupted; `dopr train ... --out {args.out} --resume` continues from the last "
              "checkpoint", file=sys.stderr)
        return 130
    # a bad store (NaN data included), path, option or checkpoint to resume; DoPr's non-finite step
    except (*USER_ERRORS, CheckpointError, FloatingPointError) as err:
        return user_error("train", err)
    if os.environ.get("RANK", "0") == "0":  # torchrun: one process says it
        print(final_summary(final, load_checkpoint_meta(final)))
    return 0


def final_summary(final, meta: dict) -> str:
    """What a finished run left: the final validation loss and where the checkpoint is."""
    if meta.get("val_loss") is None:
        val = "no final validation loss (none computed: --val-ratio 0 or --val-every 0; or it was NaN/inf)"
    else:
        mse = meta.get("val_action_mse")
        val = f"final validation loss {meta['val_loss']:.4g}" + (f", action MSE {mse:.4g}" if mse is not None else "")
        val += " (EMA weights)"
    return f"trained {meta.get('step')} steps; {val}; checkpoint {final}"


if __name__ == "__main__":  # torchrun -m dopr.scripts.train ...
    parser = argparse.ArgumentParser(prog="python -m dopr.scripts.train",
                                     description="dopr train (see `dopr train --help`)")
    add_options(parser, TrainConfig)
    sys.exit(main(parser.parse_args()))
