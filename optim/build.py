"""`build(name, model, **kw)`: every optimizer the toolkit compares, behind one interface."""

from __future__ import annotations

import torch
from torch import nn

from .base_updates import fused_adamw_supported
from .dopr import DoPr
from .names import OPTIMIZERS

ADAMW_OPTIONS = {"lr", "weight_decay", "betas", "eps"}
MUON_OPTIONS = {"momentum", "nesterov", "ns_steps", "adjust_lr_fn", "adamw_lr"}
AP_OPTIONS = {"damping", "damping_mode", "stats", "stat_decay", "stats_every", "precond_every", "conv",
              "damping_floor", "exclude"}
DOPR_OPTIONS = ADAMW_OPTIONS | MUON_OPTIONS | AP_OPTIONS | {"skip_nonfinite"}


def build(name: str = "dopr-adamw", model: nn.Module | None = None, **kw) -> torch.optim.Optimizer:
    """Build optimizer `name` over `model`'s trainable parameters.

    kw: lr, weight_decay, betas, eps; Muon's (AdaMuon's, Signum's) momentum, nesterov, ns_steps, adjust_lr_fn,
    adamw_lr; DoPr's damping, damping_mode, stats, stat_decay, stats_every, precond_every, conv, damping_floor,
    exclude, skip_nonfinite (see DoPr). Options that do not apply to `name` are ignored, so one config serves
    every name; unknown options raise. "adamw" is torch.optim.AdamW itself (fused); "muon", "signum" and
    "adamuon" are DoPr with AP off: e.g. Muon (torch.optim.Muon's math) on every AP block's weight and AdamW on
    the rest, as one optimizer object.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"build({name!r}, model): model must be an nn.Module, got {type(model).__name__}")
    unknown = set(kw) - DOPR_OPTIONS
    if unknown:
        raise TypeError(f"build({name!r}): unknown option(s) {sorted(unknown)}; known: {sorted(DOPR_OPTIONS)}")
    if name == "adamw":
        kw = {k: v for k, v in kw.items() if k in ADAMW_OPTIONS}
        kw.setdefault("weight_decay", 1e-2)
        if not kw.get("lr", 1e-3) >= 0:
            raise ValueError(f"build('adamw'): lr must be >= 0, got {kw['lr']}")
        params = [p for p in model.parameters() if p.requires_grad]
        # torch's fused kernel where it has one (3-4x faster than its default loop on a CPU): the same
        # kernel DoPr's AdamW part runs, so timing comparisons measure AP and nothing else
        return torch.optim.AdamW(params, fused=fused_adamw_supported(params) or None, **kw)
    base = name.removeprefix("dopr-")
    if name == base:
        kw = {k: v for k, v in kw.items() if k not in AP_OPTIONS}
    return DoPr(model, base=base, precondition=name != base, **kw)
