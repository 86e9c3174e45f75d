"""DoPr: double preconditioning (Zhang et al. 2026), as a torch.optim.Optimizer built from a model.

For every nn.Linear / nn.Conv1d / nn.Conv2d with weight gradient g (out x fan_in) and inputs z:

    Sigma = (1/n) sum_i z_i z_i^T            z gets a trailing 1 when the layer has a bias
    M     = g (Sigma + gamma tr(Sigma) I)^-1  activation-wise preconditioning (AP)
    D     = GP(M)                            AdamW, Muon or SGD (gradient-wise preconditioning)
    theta <- (1 - lr wd) theta - lr D

Every other parameter goes to the base optimizer unchanged (with base="muon": AdamW for
everything that is not a supported layer's weight, as Muon's reference does).
"""

from __future__ import annotations

import fnmatch
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .activation_stats import SUPPORTED_LAYERS, InputMoments, InputStatistics
from .base_updates import adamw_update, muon_update, sgd_update
from .preconditioner import Factor, factorize, precondition

BASES = ("adamw", "muon", "sgd")
STAT_MODES = ("batch", "ema")
# The optimizer state of a layer's weight that holds DoPr's own statistics and factors; these keep
# their dtype on load (torch casts other floating state to the parameter's dtype).
AP_STATE_KEYS = ("ap_inverse", "ap_cholesky", "sigma_ema", "sigma_count")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class _Layer:
    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.weight = module.weight
        bias = module.bias
        self.bias = bias if bias is not None and bias.requires_grad else None
        # The refreshed inverse cast to the gradient's dtype (e.g. bfloat16 weights) once per refresh, not
        # once per step; not optimizer state: rebuilt whenever the stored inverse changes.
        self.cast_inverse: tuple[torch.Tensor, torch.Tensor] | None = None  # (stored inverse, cast copy)

    def inverse_for(self, inverse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if inverse.dtype == dtype:
            return inverse
        if self.cast_inverse is None or self.cast_inverse[0] is not inverse or self.cast_inverse[1].dtype != dtype:
            self.cast_inverse = (inverse, inverse.to(dtype))
        return self.cast_inverse[1]


def _is_excluded(exclude, name: str, module: nn.Module) -> bool:
    if callable(exclude):
        return bool(exclude(name, module))
    return any(
        (item is module) if isinstance(item, nn.Module) else fnmatch.fnmatchcase(name, item) for item in exclude
    )


class DoPr(torch.optim.Optimizer):
    """DoPr over `model`'s trainable parameters.

    Args:
        model: the module being trained (a DDP/compile wrapper is fine); forward hooks on its
            Linear/Conv1d/Conv2d layers record their inputs in training mode.
        lr, weight_decay: the base optimizer's (decoupled weight decay for every base).
        base: "adamw", "muon" or "sgd" (the gradient-wise preconditioner).
        damping: gamma in Sigma + gamma tr(Sigma) I. The default 0.1 bounds the condition number of
            the damped matrix by 11 and won the held-out-loss sweep (optim/sweep_defaults.py) where a
            batch has fewer rows than a layer has inputs; 1e-3 fitted faster and generalized worse.
        stats: "batch" (the paper's: the Sigma of the batch of the step that refreshes the
            preconditioner) or "ema" (an exponential moving average of Sigma over steps, bias-corrected).
        stat_decay: the EMA's decay per recorded step.
        stats_every: with stats="ema", record inputs every this many steps (other steps cost nothing).
        precond_every: refresh the factorization every this many steps (step 0 always). The default 20
            halves the refresh's share of the step (DoPr-AdamW 1.34x -> 1.26x the unfused AdamW's step on
            the CPU MLP benchmark) at no measured cost: held-out loss 0.0391 vs 0.0390 at 10 (sweep_defaults),
            lift closed-loop success 0.935 vs 0.950 (2 seeds x 100 episodes, within noise;
            docs/results/dopr-study).
        damping_floor: absolute damping added to gamma tr(Sigma), so a layer with all-zero inputs stays finite.
        betas, eps: AdamW's (also for Muon's non-matrix parameters).
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's (momentum is SGD's with base="sgd";
            default 0.95 for Muon, 0 for SGD).
        adamw_lr: with base="muon", the lr of the AdamW part (default: lr).
        exclude: module-name patterns (fnmatch), modules, or a predicate (name, module) -> bool;
            matching layers get no AP.
        precondition: False switches AP off (then DoPr is exactly its base optimizer).
        skip_nonfinite: skip (and count in `skipped_steps`) a step whose gradients or statistics
            are NaN/inf instead of raising; the weights are left untouched either way.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        base: str = "adamw",
        damping: float = 0.1,
        stats: str = "batch",
        stat_decay: float = 0.95,
        stats_every: int = 1,
        precond_every: int = 20,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float | None = None,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        adamw_lr: float | None = None,
        damping_floor: float = 1e-8,
        exclude=(),
        precondition: bool = True,
        skip_nonfinite: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"DoPr is built from the model (an nn.Module), got {type(model).__name__}")
        if base not in BASES:
            raise ValueError(f"DoPr: base must be one of {BASES}, got {base!r}")
        if stats not in STAT_MODES:
            raise ValueError(f"DoPr: stats must be one of {STAT_MODES}, got {stats!r}")
        for key, value in (("lr", lr), ("damping", damping), ("weight_decay", weight_decay),
                           ("damping_floor", damping_floor), ("eps", eps)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"DoPr: {key} must be a finite number >= 0, got {value}")
        if adamw_lr is not None and not adamw_lr >= 0:
            raise ValueError(f"DoPr: adamw_lr must be >= 0, got {adamw_lr}")
        if not 0.0 <= stat_decay < 1.0:
            raise ValueError(f"DoPr: stat_decay must be in [0, 1), got {stat_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"DoPr: betas must be in [0, 1), got {betas}")
        for key, value in (("stats_every", stats_every), ("precond_every", precond_every), ("ns_steps", ns_steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"DoPr: {key} must be an integer >= 1, got {value}")
        if momentum is None:
            momentum = 0.95 if base == "muon" else 0.0
        if momentum < 0:
            raise ValueError(f"DoPr: momentum must be >= 0, got {momentum}")

        inner = unwrap_model(model)
        self.layers: list[_Layer] = []
        seen = set()
        for name, module in inner.named_modules():
            if not isinstance(module, SUPPORTED_LAYERS) or not module.weight.requires_grad:
                continue
            if id(module.weight) in seen or _is_excluded(exclude, name, module):
                continue
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
                warnings.warn(f"DoPr: conv layer '{name}' has groups={module.groups}; it gets no AP "
                              f"(base optimizer only)")
                continue
            seen.add(id(module.weight))
            self.layers.append(_Layer(name, module))
        if precondition and not self.layers:
            raise ValueError(
                f"DoPr: model {type(inner).__name__} has no trainable nn.Linear/Conv1d/Conv2d layer to precondition "
                "(after `exclude`); use a plain optimizer (build('adamw', ...)) or precondition=False"
            )
        self._param_names = {id(p): n for n, p in inner.named_parameters()}

        named = [p for p in inner.parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"DoPr: model {type(inner).__name__} has no trainable parameters")
        hyper = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum,
                     nesterov=nesterov, ns_steps=int(ns_steps), ns_eps=1e-7, adjust_lr_fn=adjust_lr_fn)
        if base == "muon":
            matrices = {id(layer.weight) for layer in self.layers}
            groups = [
                dict(params=[p for p in named if id(p) in matrices], kind="muon"),
                dict(params=[p for p in named if id(p) not in matrices], kind="adamw",
                     lr=lr if adamw_lr is None else adamw_lr),
            ]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [dict(params=named, kind=base)]
        super().__init__(groups, hyper)

        self.precondition = precondition
        self.damping, self.damping_floor = float(damping), float(damping_floor)
        self.stats, self.stat_decay = stats, float(stat_decay)
        self.stats_every, self.precond_every = int(stats_every), int(precond_every)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._step = 0
        self._warned_unseen: set[str] = set()
        self._inputs = InputStatistics({l.name: l.module for l in self.layers} if precondition else {})
        self._inputs.active = self._records_at(0)

    # ----- schedule: which steps record inputs and refresh the factorization -----
    def _refreshes_at(self, t: int) -> bool:
        return self.precondition and t % self.precond_every == 0

    def _records_at(self, t: int) -> bool:
        if not self.precondition:
            return False
        if self.stats == "batch":
            return self._refreshes_at(t)
        return t % self.stats_every == 0

    # ----- the step -----
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            if all(p.grad is None for g in self.param_groups for p in g["params"]):
                return loss  # nothing to update (as torch's optimizers): the schedule does not advance
            sigmas = self._current_sigmas() if self._inputs.active else {}
            if sigmas is None or not self._grads_finite():
                self.skipped_steps += 1  # the step is retried with the next batch: same schedule
                return loss
            refresh = self._refreshes_at(self._step)
            if self.stats == "ema":
                sigmas = self._update_ema(sigmas, corrected=refresh)
            if refresh and sigmas:  # none after remove_hooks(): every layer keeps its preconditioner
                self._refresh(sigmas)
            self._apply_updates()
            self._step += 1
        finally:
            self._inputs.clear()
            self._inputs.active = self._records_at(self._step)
        return loss

    def _current_sigmas(self) -> dict[str, torch.Tensor] | None:
        """This step's Sigma per layer (all ranks' inputs combined); None to skip a non-finite step."""
        moments = self._inputs.moments
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            moments = self._all_reduce(moments)
        layers = [l for l in self.layers if l.name in moments]
        if not layers:
            raise RuntimeError(
                "DoPr: no layer inputs were recorded before this step; run the forward pass in training mode "
                "(model.train()) with gradients enabled, after building the optimizer"
            )
        peak = torch.stack(torch._foreach_norm([moments[l.name].zz for l in layers]))
        if not torch.isfinite(peak).all():
            bad = [l.name for l, v in zip(layers, peak.tolist()) if not math.isfinite(v)]
            return self._nonfinite(f"the inputs of layer(s) {bad}")
        return {l.name: moments[l.name].sigma(homogeneous=l.bias is not None) for l in layers}

    def _all_reduce(self, moments: dict[str, InputMoments]) -> dict[str, InputMoments]:
        """Sum the moments over ranks (then Sigma = sum / total count): every rank gets the same Sigma."""
        ref = self.layers[0].weight
        parts, counts = [], []
        for l in self.layers:
            d = l.weight[0].numel()
            m = moments.get(l.name)
            parts += [m.zz.flatten(), m.z] if m else [ref.new_zeros(d * d + d, dtype=torch.float32)]
            counts.append(m.n if m else 0)
        flat = torch.cat(parts)
        count = torch.tensor(counts, dtype=torch.float64, device=flat.device)
        dist.all_reduce(flat)
        dist.all_reduce(count)
        out, offset = {}, 0
        for l, n in zip(self.layers, count.tolist()):
            d = l.weight[0].numel()
            if n > 0:
                second = flat[offset:offset + d * d].view(d, d)
                out[l.name] = InputMoments(second, flat[offset + d * d:offset + d * d + d], int(n))
            offset += d * d + d
        return out

    def _grads_finite(self) -> bool:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return True
        # the 2-norm is 20x cheaper than the max-norm; it also flags gradients beyond ~1e19 (overflow)
        peak = torch.stack(torch._foreach_norm([p.grad for p in params]))
        if math.isfinite(peak.sum().item()):  # one reduction: a NaN or inf norm makes the sum non-finite
            return True
        bad = [self._param_names.get(id(p), "?") for p, v in zip(params, peak.tolist()) if not math.isfinite(v)]
        return self._nonfinite(f"the gradient of parameter(s) {bad}") is not None

    def _nonfinite(self, what: str):
        if self.skip_nonfinite:
            return None
        raise FloatingPointError(
            f"DoPr: NaN or inf (or overflow) in {what} at step {self._step}; the weights were not updated "
            "(pass skip_nonfinite=True to skip such steps)"
        )

    def _update_ema(self, sigmas: dict[str, torch.Tensor], corrected: bool) -> dict[str, torch.Tensor]:
        """Fold this step's Sigma into the EMA; when `corrected`, return the bias-corrected EMA of every layer."""
        out = {}
        for l in self.layers:
            state = self.state[l.weight]
            if l.name in sigmas:
                if "sigma_ema" not in state:
                    state["sigma_ema"] = torch.zeros_like(sigmas[l.name])
                    state["sigma_count"] = torch.tensor(0.0)
                state["sigma_ema"].lerp_(sigmas[l.name], 1 - self.stat_decay)
                state["sigma_count"] += 1
            if corrected and "sigma_ema" in state:
                out[l.name] = state["sigma_ema"] / (1 - self.stat_decay ** state["sigma_count"].item())
        return out

    def _refresh(self, sigmas: dict[str, torch.Tensor]) -> None:
        layers = [l for l in self.layers if l.name in sigmas]
        for l in self.layers:
            if l.name not in sigmas and l.weight.grad is not None and l.name not in self._warned_unseen:
                self._warned_unseen.add(l.name)
                warnings.warn(f"DoPr: layer '{l.name}' has a gradient but its forward was never observed "
                              "(called functionally?); it keeps its last preconditioner, or none")
        names = [l.name for l in layers]
        factors = factorize(names, [sigmas[n] for n in names], self.damping, self.damping_floor)
        for l, f in zip(layers, factors):
            state = self.state[l.weight]
            state.pop("ap_inverse", None)
            state.pop("ap_cholesky", None)
            state["ap_inverse" if f.inverse is not None else "ap_cholesky"] = (
                f.inverse if f.inverse is not None else f.cholesky
            )

    def _apply_updates(self) -> None:
        grads = {}  # id(param) -> the gradient the base optimizer sees (M for AP layers)
        for l in self.layers if self.precondition else ():
            state, g_w = self.state[l.weight], l.weight.grad
            if g_w is None or not ("ap_inverse" in state or "ap_cholesky" in state):
                continue
            g_b = l.bias.grad if l.bias is not None else None
            if l.bias is not None and g_b is None:
                g_b = torch.zeros_like(l.bias)
            inverse = state.get("ap_inverse")
            factor = Factor(None if inverse is None else l.inverse_for(inverse, g_w.dtype), state.get("ap_cholesky"))
            m_w, m_b = precondition(g_w.reshape(g_w.shape[0], -1), g_b, factor)
            grads[id(l.weight)] = m_w.view(g_w.shape)
            if m_b is not None:
                grads[id(l.bias)] = m_b
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            g = [grads.get(id(p), p.grad) for p in params]
            states = [self.state[p] for p in params]
            kind, lr, wd = group["kind"], group["lr"], group["weight_decay"]
            if kind == "adamw":
                adamw_update(params, g, states, lr, group["betas"], group["eps"], wd)
            elif kind == "muon":
                muon_update(params, g, states, lr, group["momentum"], group["nesterov"], wd,
                            group["ns_steps"], group["ns_eps"], group["adjust_lr_fn"])
            else:
                sgd_update(params, g, states, lr, group["momentum"], group["nesterov"], wd)

    # ----- checkpointing: the statistics, factors and schedule position travel with the state -----
    def state_dict(self):
        sd = super().state_dict()
        sd["dopr_step"] = self._step
        sd["dopr_skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in state_dict["state"].items():
            p = params[idx]
            for key in AP_STATE_KEYS:
                if key in saved:  # keep float64 factors float64, float32 statistics float32
                    self.state[p][key] = saved[key].to(device=p.device if key != "sigma_count" else "cpu",
                                                       dtype=saved[key].dtype, copy=True)
        self._step = int(state_dict.get("dopr_step", 0))
        self.skipped_steps = int(state_dict.get("dopr_skipped_steps", 0))
        self._inputs.clear()
        self._inputs.active = self._records_at(self._step)

    def remove_hooks(self) -> None:
        """Detach the forward hooks (the optimizer can no longer refresh AP after this)."""
        self._inputs.remove()
