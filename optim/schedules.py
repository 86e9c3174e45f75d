"""Learning-rate schedules for any torch optimizer (DoPr's groups included)."""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to 1 over `warmup_steps`, then a cosine from 1 down to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR scaling every group's initial lr by `warmup_cosine_factor`; call `.step()` after each
    optimizer step."""
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"warmup_cosine: need warmup_steps >= 0, total_steps >= 1, 0 <= min_ratio <= 1; "
                         f"got {warmup_steps}, {total_steps}, {min_ratio}")
    factor = partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
