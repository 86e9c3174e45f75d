"""`dopr bench WHAT`: speed and memory benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

import argparse
import importlib

# benchmark -> module with `main(argv) -> int`, or "module:function" for another function of that signature
BENCHMARKS = {
    "optim": "dopr.optim.bench",
    "data": "dopr.data.bench",
    "lerobot": "dopr.data.bench:main_lerobot",
    "collect": "dopr.envs.bench",
    "train": "dopr.train.bench",
    "eval": "dopr.eval.bench",
    "ray": "dopr.eval.bench_ray",
    "serve": "dopr.deploy.bench",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="speed/memory benchmarks (optim, data, lerobot, collect, train, eval, ray, serve)",
        description="Run a benchmark; every benchmark prints ratios measured side by side in one run. "
        "Pass the benchmark's own options after its name (`dopr bench optim --help`).",
    )
    p.add_argument("what", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for that benchmark")
    p.set_defaults(func=main)


def main(args) -> int:
    module, _, function = BENCHMARKS[args.what].partition(":")
    return int(getattr(importlib.import_module(module), function or "main")(args.rest) or 0)
