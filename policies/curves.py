"""Training curves of run folders (metrics.jsonl) drawn to a PNG: validation loss vs step, one line per run.

    python -m dopr.policies.curves out/figs/lift100_val.png out/runs/lift100-mlp-adamw out/runs/lift100-mlp-dopr-adamw
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dopr.atomic import read_jsonl


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's metrics.jsonl (a line cut by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (is {run_dir} a `dopr train` run folder?)")
    return read_jsonl(path)


def plot_curves(run_dirs, out_png, keys=("val_loss", "val_action_mse"), labels=None, title=None, log_y=True) -> Path:
    """One panel per metric key, one line per run; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in run_dirs]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run, label in zip(run_dirs, labels):
            pts = [(m["step"], m[key]) for m in read_metrics(run) if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker=".", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dopr.policies.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("png", help="output PNG")
    p.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl)")
    p.add_argument("--keys", default="val_loss,val_action_mse", help="metrics to plot (default %(default)s)")
    p.add_argument("--title", default=None)
    p.add_argument("--linear", action="store_true", help="linear y axis")
    args = p.parse_args(argv)
    print(plot_curves(args.runs, args.png, keys=args.keys.split(","), title=args.title, log_y=not args.linear))
    return 0


if __name__ == "__main__":
    sys.exit(main())
