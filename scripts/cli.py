"""The `dopr` command: one subcommand per stage of the pipeline.

Each subcommand lives in its own module of dopr.scripts and exposes `add_parser(subparsers)`
(which sets `func` on its parser) and keeps heavy imports (torch, mujoco) inside the function it
runs, so that `dopr --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import dopr

# subcommand -> module; listed in pipeline order, which is the order `dopr --help` shows them.
SUBCOMMANDS = [
    "expert",
    "collect",
    "data",
    "train",
    "eval",
    "report",
    "archive",
    "experiment",
    "export",
    "serve",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dopr",
        description=(
            "Behavior-cloning policies trained with DoPr (double preconditioning) and evaluated "
            "closed-loop in MuJoCo: collect demonstrations, train, evaluate, report, deploy."
        ),
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {dopr.__version__} (from {os.path.dirname(dopr.__file__)})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"dopr.scripts.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
