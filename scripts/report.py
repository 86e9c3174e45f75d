"""`dopr report`: closed-loop success against validation loss across runs (the test-time feedback, TTF, report)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="markdown report + plots: success vs validation loss across runs, optimizers and checkpoints",
        description=(
            "Read training runs (runs/NAME/config.json, metrics.jsonl, ckpt-*/meta.json and the "
            "ckpt-*/eval/results.json written by `dopr eval`) and write report.md with tables and PNG "
            "figures: success vs validation loss (one point per checkpoint, coloured by optimizer), "
            "validation loss and success vs training step, the Spearman rank correlation between "
            "validation loss and success over independent runs (final checkpoints; checkpoints at one training "
            "step) with the all-checkpoint rho as a description only, the compounding-error curve (from `dopr "
            "eval --compounding-error`: median and band, the episodes each step rests on, cut where few run), "
            "and the final checkpoints per cell with each DoPr configuration paired against its base optimizer "
            "at the same lr (by training seed and episode seed); where the same pair ran on several tasks, one more "
            "row pools the (task, seed) units."
        ),
    )
    p.add_argument("runs", nargs="+", help="run folders, e.g. runs/*")
    p.add_argument("--out", default="out/report", help="output folder (default out/report)")
    p.set_defaults(func=main)


def main(args) -> int:
    import sys

    from dopr.eval.report import build_report

    try:
        path = build_report(args.runs, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"dopr report: error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
