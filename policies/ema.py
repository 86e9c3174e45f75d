"""Exponential moving average of a policy's weights (what evaluation loads by default)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """ema = decay_t * ema + (1 - decay_t) * weights after every optimizer step, with
    decay_t = min(decay, (1 + t) / (10 + t)) so early averages are not dominated by the random init.
    Buffers (the normalizer's statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, ema_model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model, self.ema_model, self.decay = model, ema_model, decay
        self.steps = 0
        ema_model.load_state_dict(model.state_dict())
        ema_model.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.ema_model.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.ema_model.buffers(), self.model.buffers()):
            e.copy_(b)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.decay = int(state["steps"]), float(state["decay"])
