"""Stage 1's selection (PROTOCOL.md, amendments 1 and 2), applied mechanically to the tuning runs.

    python docs/results/humanoid/select_tuned.py out/humanoid/stage1-tune [out/humanoid/stage1-extend ...]
    python docs/results/humanoid/select_tuned.py docs/results/humanoid/archive/stage1-tune     # the committed archive
    python docs/results/humanoid/select_tuned.py out/walker2d/stage1-tune      # Walker2d: AdamW and DoPr-AdamW only

Prints each arm's final return per lr (mean of the tuning seeds, each seed in parentheses), the lr the rule takes
(the best mean; among lrs within 5% of it, the lowest), the form of AdamW (weight decay) and of DoPr-AdamW (the
default or the paper's) the rule takes, the grid extensions the rule asks for (an arm's best or chosen lr at an end
of its grid: one more lr past that end, for the arm and its counterpart), and, when nothing is missing, the
reporting stage's `optims` list. Exit status 0 only when the selection is final (every grid complete, no extension
pending).
"""

from __future__ import annotations

import glob
import math
import os
import sys

from dopr.eval.comparison import cells_from_runs
from dopr.eval.tuning import TunedArm, better_form, tune_arms

# the base optimizers each task's study tunes, each with its DoPr arm (PROTOCOL.md; amendment 3 for Walker2d)
BASES = {"humanoid": ("adamw", "muon", "signum", "adamuon"), "walker2d": ("adamw",)}
DOPR_DEFAULT = "stats=batch:precond_every=20:damping_mode=trace:damping=0.1"  # amendment 2
# the second form each of these two arms is tuned in (amendment 2); it replaces the default only if >5% better
ALTERNATIVE = {"adamw": "adamw:weight_decay=1e-2",
               "dopr-adamw": "dopr-adamw:stats=same-batch:damping_mode=trace:damping=1e-4"}
TOLERANCE = MARGIN = 0.05
GRID, SEEDS = (1e-4, 3e-4, 1e-3, 3e-3), 2  # stage 1's lrs and tuning seeds (100-101)


def default_arm(optimizer: str) -> str:
    return f"{optimizer}:{DOPR_DEFAULT}" if optimizer.startswith("dopr-") else optimizer


def counterpart(optimizer: str) -> str:
    return optimizer.removeprefix("dopr-") if optimizer.startswith("dopr-") else f"dopr-{optimizer}"


def next_lr(lr: float, side: str) -> float:
    """The next lr past `lr` on the 1-3 grid (..., 3e-5, 1e-4, 3e-4, ...)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10**exponent)
    if side == "below":
        return 3 * 10 ** (exponent - 1) if mantissa == 1 else 10**exponent
    return 3 * 10**exponent if mantissa == 1 else 10 ** (exponent + 1)


def with_lr(arm: str, lr: float) -> str:
    optimizer, *settings = arm.split(":")
    return ":".join([optimizer, f"lr={lr_text(lr)}", *settings])


def lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def grid_table(arms: list[TunedArm]) -> list[str]:
    lrs = sorted({lr for arm in arms for lr in arm.by_lr})
    lines = ["| arm | " + " | ".join(f"lr {lr_text(lr)}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for arm in arms:
        cells = []
        for lr in lrs:
            if lr not in arm.by_lr:
                cells.append("-")
                continue
            text = f"{arm.mean(lr):.0f} ({', '.join(f'{v:.0f}' for v in arm.by_lr[lr])})"
            if arm.complete and lr == arm.chosen_lr:
                text = f"**{text}**"
            cells.append(text + (" (best)" if arm.complete and lr == arm.best_lr != arm.chosen_lr else ""))
        lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    return lines


def selection(stage_dirs: list[str]) -> tuple[str, list[str], list[str] | None]:
    """(what main prints, the grid extensions asked for, the reporting optims: None until final)."""
    out: list[str] = []  # main prints these lines; the study driver (run_study.py) reads the two lists
    # an experiment's folder holds its runs under runs/; an archive (`dopr archive`) holds them directly
    runs = sorted(d for stage in stage_dirs
                  for d in glob.glob(os.path.join(stage, "runs", "*") if os.path.isdir(os.path.join(stage, "runs"))
                                     else os.path.join(stage, "*")))
    cells = cells_from_runs(runs)
    tasks = sorted({cell.task for cell in cells})
    if len(tasks) != 1 or tasks[0] not in BASES:
        raise SystemExit(f"select_tuned.py: the runs under {stage_dirs} are of task(s) {tasks}; one of "
                         f"{sorted(BASES)} expected")
    bases = BASES[tasks[0]]
    arms = {arm.name: arm for arm in tune_arms(cells, TOLERANCE, GRID, SEEDS)}
    out.append("Final return per lr, mean of the tuning seeds (each seed); bold: the lr the rule takes.\n")
    out.append("\n".join(grid_table(list(arms.values()))) + "\n")
    wanted = [default_arm(o) for b in bases for o in (b, f"dopr-{b}")] + list(ALTERNATIVE.values())
    missing = [name for name in wanted if name not in arms or not arms[name].complete]
    if missing:
        out.append(f"Not final: {len(missing)} arm(s) without a complete grid: {', '.join(missing)}")
        return "\n".join(out), [], None
    tuned = {}
    for b in bases:
        for optimizer in (b, f"dopr-{b}"):
            arm = default = arms[default_arm(optimizer)]
            if optimizer in ALTERNATIVE:
                alternative = arms[ALTERNATIVE[optimizer]]
                arm = better_form(default, alternative, MARGIN)
                out.append(f"- {optimizer}: form {arm.name!r} (the alternative is taken only if >{MARGIN:.0%} better: "
                           f"{default.chosen_mean:.0f} vs {alternative.chosen_mean:.0f})")
            tuned[optimizer] = arm
    extensions = []
    for optimizer, arm in tuned.items():
        for side in arm.extend:
            end_of = min if side == "below" else max
            end = end_of(arm.by_lr)
            for name in (arm.name, tuned[counterpart(optimizer)].name):
                target = arms[name]
                lr = next_lr(end_of(target.by_lr), side)
                spec = with_lr(name, lr)
                if spec not in extensions and lr not in target.by_lr:
                    extensions.append(spec)
            out.append(f"- {optimizer}: chosen lr {lr_text(arm.chosen_lr)} / best {lr_text(arm.best_lr)} at the {side} "
                       f"end ({lr_text(end)}) of its grid")
    if extensions:
        out.append("\nNot final: the grid extensions the rule asks for (run on the tuning seeds, then read again):")
        out.append("optims = [\n" + "".join(f'    "{s}",\n' for s in extensions) + "]")
        return "\n".join(out), extensions, None
    final = [with_lr(arm.name, arm.chosen_lr) for arm in tuned.values()]
    out.append("\nFinal. The reporting stage's optims:")
    out.append("optims = [\n" + "".join(f'    "{s}",\n' for s in final) + "]")
    return "\n".join(out), [], final


def main(stage_dirs: list[str]) -> int:
    text, _, final = selection(stage_dirs)
    print(text)
    return 0 if final is not None else 1


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    sys.exit(main(sys.argv[1:]))
