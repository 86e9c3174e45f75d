"""Reading a tuning grid by closed-loop outcome: each arm's lr, and where its grid must grow.

A study tunes each arm (a configuration without its lr, e.g. "dopr-adamw:stats=batch") over a grid of lrs on
tuning seeds, and takes
  - the best lr: the highest mean outcome (success rate or return) over the tuning seeds;
  - the chosen lr: the lowest lr whose mean lies within `tolerance` (a fraction of the best's magnitude) of the
    best, so that a higher lr that buys less than the seed noise is not taken;
  - an extension of the grid past an end where the best or the chosen lr lies at it: the optimum may lie beyond,
    and an arm must not be judged at an lr its optimum is past.
Validation loss plays no part: the choice is by closed-loop outcome (the project's rule).

    arms = tune_arms(cells_from_runs(run_dirs))            # dopr.eval.comparison cells of one task and policy
    for arm in arms: arm.name, arm.chosen_lr, arm.extend
    better_form(default_arm, alternative_arm, margin=0.05)   # the alternative only if it wins by more than margin
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass


def arm_name(configuration: str) -> str:
    """The configuration without its lr setting: "dopr-adamw:lr=1e-3:damping=0.1" -> "dopr-adamw:damping=0.1"."""
    return ":".join(item for item in configuration.split(":") if not item.startswith("lr="))


@dataclass
class TunedArm:
    name: str
    by_lr: dict[float, list[float]]  # lr -> each tuning seed's mean outcome
    tolerance: float = 0.05
    grid: tuple[float, ...] = ()  # the lrs the study asked for (beyond them: extensions)
    seeds: int | None = None  # the tuning seeds each lr is to be run on

    def mean(self, lr: float) -> float:
        values = self.by_lr[lr]
        return sum(values) / len(values)

    @property
    def complete(self) -> bool:
        """Every lr of the grid is there, each with all its seeds (a grid still running is not read)."""
        counts = {len(v) for v in self.by_lr.values()}
        return (set(self.grid) <= set(self.by_lr) and len(counts) == 1
                and (self.seeds is None or counts == {self.seeds}))

    @property
    def best_lr(self) -> float:
        return max(self.by_lr, key=lambda lr: (self.mean(lr), -lr))  # a tie goes to the lower lr

    @property
    def chosen_lr(self) -> float:
        best = self.mean(self.best_lr)
        return min(lr for lr in self.by_lr if self.mean(lr) >= best - self.tolerance * abs(best))

    @property
    def chosen_mean(self) -> float:
        return self.mean(self.chosen_lr)

    @property
    def extend(self) -> list[str]:
        """"below" and/or "above": the ends of the grid that the best or the chosen lr lies at."""
        lrs, at = sorted(self.by_lr), {self.best_lr, self.chosen_lr}
        return ([] if len(lrs) < 2 else
                [side for side, end in (("below", lrs[0]), ("above", lrs[-1])) if end in at])


def tune_arms(cells, tolerance: float = 0.05, grid: tuple[float, ...] = (), seeds: int | None = None) -> list[TunedArm]:
    """One TunedArm per arm of `cells` (dopr.eval.comparison.Cell, all of one task and policy), in first-seen order;
    an arm's outcome per seed is its cell's primary metric on the final checkpoint. `grid` and `seeds`: what each
    arm is to have been run on before it is complete."""
    by_arm: dict[str, dict[float, list[float]]] = defaultdict(dict)
    for cell in cells:
        if cell.lr is None:
            raise ValueError(f"tuning: configuration {cell.configuration!r} has no lr recorded in its runs")
        by_arm[arm_name(cell.configuration)][float(cell.lr)] = cell.values()
    return [TunedArm(name, by_lr, tolerance, tuple(grid), seeds) for name, by_lr in by_arm.items()]


def better_form(default: TunedArm, alternative: TunedArm, margin: float = 0.05) -> TunedArm:
    """The alternative form of an arm (another weight decay, another preconditioner form) only if its mean at its
    chosen lr beats the default's at its chosen lr by more than `margin` of the default's magnitude."""
    base = default.chosen_mean
    return alternative if alternative.chosen_mean > base + margin * abs(base) else default
