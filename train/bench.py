"""`dopr bench train`: training samples/s for each policy x optimizer, and the data loader's share of a step.

Each combination is a real `dopr train` run (the same loop, data path and checkpoint writing) on an
episode store; the numbers come from the run's own metrics.jsonl (its last logging window, so
start-up and the first steps are excluded). Ratios are to AdamW on the same policy, measured in
this one invocation.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dopr bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="out/demos/lift100.zarr", help="episode store (default %(default)s)")
    p.add_argument("--policies", default=None, help="comma-separated (default: every policy kind)")
    p.add_argument("--optims", default=None, help="comma-separated (default: every optimizer)")
    p.add_argument("--steps", type=int, default=40,
                   help="timed steps per combination, after as many untimed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="MLP batch size (default %(default)s)")
    p.add_argument("--unet-batch-size", type=int, default=64, help="diffusion/flow batch size (default %(default)s)")
    p.add_argument("--down-dims", default="64,128,256",
                   help="UNet widths (default %(default)s: the 256,512,1024 recipe takes ~5 s per step of 64 on "
                        "one CPU core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--out", default="out/bench/train", help="scratch run folders (default %(default)s)")
    args = p.parse_args(argv)

    from dopr.train.config import MLP_KINDS, OPTIMIZERS, POLICY_KINDS, TrainConfig
    from dopr.train.loop import train

    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: no episode store; collect one with "
                         f"`dopr collect --task lift --episodes 100 --out {args.data}`")
    rows = []
    policies = [x for x in args.policies.split(",") if x] if args.policies else list(POLICY_KINDS)
    optims = [x for x in args.optims.split(",") if x] if args.optims else list(OPTIMIZERS)
    for policy in policies:
        for optim in optims:
            out = Path(args.out) / f"{policy}-{optim}"
            shutil.rmtree(out, ignore_errors=True)
            batch = args.batch_size if policy in MLP_KINDS else args.unet_batch_size
            cfg = TrainConfig(
                data=args.data, out=str(out), policy=policy, optim=optim, steps=2 * args.steps, batch_size=batch,
                val_ratio=0.0, val_every=0, ckpt_every=0, log_every=args.steps, threads=args.threads,
                device=args.device, bf16=args.bf16, progress=False, warmup_steps=0,
                down_dims=[int(d) for d in args.down_dims.split(",")],
            )
            train(cfg)
            last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
            rows.append((policy, optim, batch, last["steps_per_s"] * batch, last["data_frac"]))
            print(f"  {policy:<9} {optim:<10} {rows[-1][3]:9.1f} samples/s  data {100 * rows[-1][4]:5.1f}%", flush=True)

    print(f"\ntraining throughput on {args.device}, {args.threads} thread(s), {args.steps} timed steps; "
          f"UNet down_dims {args.down_dims}; data: {args.data}")
    print(f"  {'policy':<9} {'optimizer':<10} {'batch':>5} {'samples/s':>10} {'x adamw':>8} {'data share':>11}")
    for policy, optim, batch, sps, frac in rows:
        ref = next((r[3] for r in rows if r[0] == policy and r[1] == "adamw"), None)
        ratio = f"{sps / ref:8.2f}" if ref else f"{'-':>8}"
        print(f"  {policy:<9} {optim:<10} {batch:>5} {sps:10.1f} {ratio} {100 * frac:10.1f}%")
    worst = max(r[4] for r in rows)
    print(f"data loading share: max {100 * worst:.1f}% of the step (goal < 10%)")
    return 0
