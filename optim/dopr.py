"""DoPr: double preconditioning (Zhang et al. 2026), as a torch.optim.Optimizer built from a model.

For every AP block (nn.Linear, nn.Conv1d/2d, the projections of nn.MultiheadAttention; ap_blocks.py)
with weight gradient g (rows x d) and inputs z:

    Sigma = (1/n) sum_i z_i z_i^T            z gets a trailing 1 when the layer has a bias
    M     = g (Sigma + delta I)^-1           activation-wise preconditioning (AP)
    D     = GP(M)                            AdamW, Muon, Signum, AdaMuon or SGD (gradient-wise)
    theta <- (1 - lr wd) theta - lr D

delta = gamma tr(Sigma) (the paper's form) or gamma tr(Sigma) / d (damping_mode="mean_eig").
Every other parameter goes to the base optimizer unchanged (with the Muon-type bases: AdamW for
everything that is not an AP block's weight, as Muon's reference does).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .activation_stats import InputMoments, InputStatistics
from .ap_blocks import APBlock, find_blocks
from .base_updates import adamuon_update, adamw_update, muon_update, sgd_update, signum_update
from .names import BASES, CONV_FORMS, DAMPING_MODES, STAT_MODES
from .preconditioner import (
    Damping,
    Factor,
    dual_flops,
    factorize,
    gradient_scale,
    precondition,
    precondition_dual,
    precondition_dual_outputs,
    precondition_same_batch,
    primal_flops,
)

MATRIX_BASES = ("muon", "adamuon")  # update AP weights as matrices, everything else with AdamW
DEFAULT_MOMENTUM = {"muon": 0.95, "adamuon": 0.95, "signum": 0.9}
# The optimizer state of a layer's weight that holds DoPr's own statistics and factors; these keep
# their dtype on load (torch casts other floating state to the parameter's dtype). A block that owns
# only some rows of its weight (attention's q, k, v) adds a suffix (":q").
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


class _CastCache:
    """A stored inverse cast to the gradient's dtype (e.g. bfloat16 weights) once per refresh, not once per
    step; not optimizer state: rebuilt whenever the stored inverse changes."""

    def __init__(self):
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None  # (stored inverse, cast copy)

    def __call__(self, inverse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if inverse.dtype == dtype:
            return inverse
        if self.pair is None or self.pair[0] is not inverse or self.pair[1].dtype != dtype:
            self.pair = (inverse, inverse.to(dtype))
        return self.pair[1]


class DoPr(torch.optim.Optimizer):
    """DoPr over `model`'s trainable parameters.

    Args:
        model: the module being trained (a DDP/compile wrapper is fine); forward hooks on its
            Linear/Conv1d/Conv2d/MultiheadAttention layers record their inputs in training mode.
        lr, weight_decay: the base optimizer's (decoupled weight decay for every base).
        base: "adamw", "muon", "signum", "adamuon" or "sgd" (the gradient-wise preconditioner).
        damping: gamma in delta = gamma tr(Sigma) (damping_mode "trace") or gamma tr(Sigma)/d ("mean_eig").
            The default 0.1 (trace) bounds the condition number of the damped matrix by 11 and won the
            held-out-loss sweep (optim/sweep_defaults.py); it is 0.1 d times Sigma's mean eigenvalue (25.7x
            at d = 257), so AP whitens weakly. Closed-loop success decides the default (issue 12's study).
        damping_mode: "trace" (the paper's form) or "mean_eig" (one gamma means the same at every width).
        stats: "batch" (the Sigma of the batch of the step that refreshes the preconditioner, reused for
            the next precond_every - 1 steps), "ema" (an exponential moving average of Sigma over steps,
            bias-corrected) or "same-batch" (the paper's pairing: every step's gradient with the Sigma of
            that step's own batch, micro-batches summed; solved, never inverted; precond_every is unused).
        stat_decay: the EMA's decay per recorded step.
        stats_every: with stats="ema", record inputs every this many steps (other steps cost nothing).
        precond_every: refresh the factorization every this many steps (step 0 always). The default 20
            halves the refresh's share of the step (DoPr-AdamW 1.34x -> 1.26x the unfused AdamW's step on
            the CPU MLP benchmark) at no measured cost: held-out loss 0.0391 vs 0.0390 at 10 (sweep_defaults),
            lift closed-loop success 0.935 vs 0.950 (2 seeds x 100 episodes, within noise;
            docs/results/dopr-study).
        conv: "channel" (M_j = g_j Sigma_c^-1 for every kernel tap, Sigma_c over channels; ap_blocks.py) or
            "patch" (K-FAC's patch covariance, (C k)^2: the form measured in docs/results/dopr-study).
        damping_floor: absolute damping added to delta, so a layer with all-zero inputs stays finite.
        betas, eps: AdamW's (also for the Muon-type bases' other parameters; AdaMuon's beta2 is betas[1]).
        momentum, nesterov, ns_steps, adjust_lr_fn: Muon's (momentum is AdaMuon's, Signum's and SGD's with
            those bases; default 0.95 for Muon and AdaMuon, 0.9 for Signum, 0 for SGD).
        adamw_lr: with a Muon-type base, the lr of the AdamW part (default: lr).
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
        damping_mode: str = "trace",
        stats: str = "batch",
        stat_decay: float = 0.95,
        stats_every: int = 1,
        precond_every: int = 20,
        conv: str = "patch",
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
        for key, value, allowed in (("base", base, BASES), ("stats", stats, STAT_MODES),
                                    ("damping_mode", damping_mode, DAMPING_MODES), ("conv", conv, CONV_FORMS)):
            if value not in allowed:
                raise ValueError(f"DoPr: {key} must be one of {allowed}, got {value!r}")
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
            momentum = DEFAULT_MOMENTUM.get(base, 0.0)
        if not 0 <= momentum < (1 if base in ("signum", *MATRIX_BASES) else math.inf):
            raise ValueError(f"DoPr: momentum must be >= 0 (and < 1 with base={base!r}), got {momentum}")

        inner = unwrap_model(model)
        self.blocks, hooked = find_blocks(inner, exclude, conv)
        if precondition and not self.blocks:
            raise ValueError(
                f"DoPr: model {type(inner).__name__} has no trainable nn.Linear/Conv1d/Conv2d/MultiheadAttention "
                "layer to precondition (after `exclude`); use a plain optimizer (build('adamw', ...)) or "
                "precondition=False"
            )
        self._param_names = {id(p): n for n, p in inner.named_parameters()}

        named = [p for p in inner.parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"DoPr: model {type(inner).__name__} has no trainable parameters")
        hyper = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, momentum=momentum,
                     nesterov=nesterov, ns_steps=int(ns_steps), ns_eps=1e-7, adjust_lr_fn=adjust_lr_fn)
        if base in MATRIX_BASES:
            matrices = {id(b.weight) for b in self.blocks}
            groups = [
                dict(params=[p for p in named if id(p) in matrices], kind=base),
                dict(params=[p for p in named if id(p) not in matrices], kind="adamw",
                     lr=lr if adamw_lr is None else adamw_lr),
            ]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [dict(params=named, kind=base)]
        super().__init__(groups, hyper)

        self.precondition = precondition
        self.damping, self.damping_floor, self.damping_mode = float(damping), float(damping_floor), damping_mode
        self._damping = Damping(self.damping, damping_mode, self.damping_floor)
        self.stats, self.stat_decay = stats, float(stat_decay)
        self.stats_every, self.precond_every = int(stats_every), int(precond_every)
        self.conv = conv
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._step = 0
        self._warned_unseen: set[str] = set()
        self._casts = {b.name: _CastCache() for b in self.blocks}
        # same-batch AP of a Linear-type block may use the n x n form while its rows fit (ap_blocks, preconditioner)
        keep_rows = {b.stats_key: b.weight.shape[-1] + b.homogeneous for b in self.blocks
                     if stats == "same-batch" and b.taps == 1 and not isinstance(b.module, (nn.Conv1d, nn.Conv2d))}
        self._inputs = InputStatistics(hooked if precondition else {}, conv=conv, keep_rows=keep_rows)
        self._inputs.active = self._records_at(0)

    # ----- schedule: which steps record inputs and refresh the factorization -----
    def _refreshes_at(self, t: int) -> bool:
        return self.precondition and self.stats != "same-batch" and t % self.precond_every == 0

    def _records_at(self, t: int) -> bool:
        if not self.precondition:
            return False
        if self.stats == "same-batch":
            return True
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
            moments = self._current_moments() if self._inputs.active else {}
            if moments is None or not self._grads_finite():
                self.skipped_steps += 1  # the step is retried with the next batch: same schedule
                return loss
            if self.stats == "same-batch":
                updates = self._same_batch_updates(moments)
            else:
                sigmas = {b.name: moments[b.stats_key].sigma(b.homogeneous) for b in self.blocks
                          if b.stats_key in moments}
                refresh = self._refreshes_at(self._step)
                if self.stats == "ema":
                    sigmas = self._update_ema(sigmas, corrected=refresh)
                if refresh and sigmas:  # none after remove_hooks(): every layer keeps its preconditioner
                    self._refresh(sigmas)
                updates = self._stored_factor_updates()
            self._apply_base(updates)
            self._step += 1
        finally:
            self._inputs.clear()
            self._inputs.active = self._records_at(self._step)
        return loss

    def _current_moments(self) -> dict[str, InputMoments] | None:
        """This step's input moments per statistics key (all ranks' combined); None to skip a non-finite step."""
        moments = self._inputs.moments
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            moments = self._all_reduce(moments)
        if not moments:
            raise RuntimeError(
                "DoPr: no layer inputs were recorded before this step; run the forward pass in training mode "
                "(model.train()) with gradients enabled, after building the optimizer"
            )
        keys = list({id(m): k for k, m in moments.items()}.values())  # attention's q, k, v may share one
        parts = [(k, t) for k in keys for t in moments[k].tensors()]
        peak = torch.stack(torch._foreach_norm([t for _, t in parts]))
        if not math.isfinite(peak.sum().item()):  # one reduction: a NaN or inf norm makes the sum non-finite
            bad = sorted({k for (k, _), v in zip(parts, peak.tolist()) if not math.isfinite(v)})
            return self._nonfinite(f"the inputs of layer(s) {bad}")
        return moments

    def _all_reduce(self, moments: dict[str, InputMoments]) -> dict[str, InputMoments]:
        """Sum the moments over ranks (then Sigma = sum / total count): every rank gets the same Sigma."""
        keys = sorted({b.stats_key: b for b in self.blocks})
        dims = {b.stats_key: _input_dim(b) for b in self.blocks}
        ref = self.blocks[0].weight
        parts, counts = [], []
        for k in keys:
            m, d = moments.get(k), dims[k]
            if m is not None:
                m.fold()  # rows cannot be summed over ranks: every rank takes the d x d form
            parts += [m.zz.flatten(), m.z] if m else [ref.new_zeros(d * d + d, dtype=torch.float32)]
            counts.append(m.n if m else 0)
        flat = torch.cat(parts)
        count = torch.tensor(counts, dtype=torch.float64, device=flat.device)
        dist.all_reduce(flat)
        dist.all_reduce(count)
        out, offset = {}, 0
        for k, n in zip(keys, count.tolist()):
            d = dims[k]
            if n > 0:
                out[k] = m = InputMoments()
                m.zz, m.z, m.n = flat[offset:offset + d * d].view(d, d), flat[offset + d * d:offset + d * d + d], n
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
            f"DoPr: NaN or inf (or overflow) in {what} at step {self._step}; the weights were not updated. "
            "A NaN or inf in the training data or the loss propagates here: check the data for non-finite values, "
            "and lower the learning rate if the loss diverged"
        )

    def _warn_unseen(self, block: APBlock) -> None:
        if block.weight.grad is not None and block.name not in self._warned_unseen:
            self._warned_unseen.add(block.name)
            warnings.warn(f"DoPr: layer '{block.name}' has a gradient but its forward was never observed "
                          "(called functionally?); it keeps its last preconditioner, or none")

    # ----- same-batch AP: this step's Sigma for this step's gradient -----
    def _same_batch_updates(self, moments: dict[str, InputMoments]) -> dict[int, torch.Tensor]:
        updates: dict[int, torch.Tensor] = {}
        primal: list[tuple[APBlock, torch.Tensor, torch.Tensor]] = []
        sigma_of: dict[tuple, torch.Tensor] = {}  # one Sigma per (moments, homogeneous): shared inputs factor once
        for b in self.blocks:
            m = moments.get(b.stats_key)
            if b.weight.grad is None:
                continue
            if m is None:
                self._warn_unseen(b)
                continue
            if m.rows:  # a Linear-type block whose batch may be smaller than its width
                g, g_b = b.gradients()
                d, outputs = g.shape[1] + b.homogeneous, m.delta_matrix() if b.part is None else None
            if m.rows and dual_flops(m.n, d, g.shape[0], outputs is not None) < primal_flops(m.n, d, g.shape[0]):
                z = m.matrix(False)
                scale = None if outputs is None else gradient_scale(g, g_b, outputs, z)
                if scale is not None:
                    m_w, m_b = precondition_dual_outputs(b.name, outputs, scale, z, b.homogeneous, self._damping)
                else:
                    m_w, m_b = precondition_dual(b.name, g, g_b, z, self._damping)
                b.write_parts(m_w.to(g.dtype), None if m_b is None else m_b.to(g.dtype), updates)
                continue
            key = (id(m), b.homogeneous)
            if key not in sigma_of:
                sigma_of[key] = m.sigma(b.homogeneous)
            primal.append((b, b.gradient(), sigma_of[key]))
        if primal:
            ms = precondition_same_batch([b.name for b, _, _ in primal], [g for _, g, _ in primal],
                                         [s for _, _, s in primal], self._damping)
            for (b, _, _), m in zip(primal, ms):
                b.write(m, updates)
        return updates

    # ----- stored factors: statistics refreshed every precond_every steps -----
    def _update_ema(self, sigmas: dict[str, torch.Tensor], corrected: bool) -> dict[str, torch.Tensor]:
        """Fold this step's Sigma into the EMA; when `corrected`, return the bias-corrected EMA of every block."""
        out = {}
        for b in self.blocks:
            state, ema, count = self.state[b.weight], "sigma_ema" + b.state_suffix, "sigma_count" + b.state_suffix
            if b.name in sigmas:
                if ema not in state:
                    state[ema] = torch.zeros_like(sigmas[b.name])
                    state[count] = torch.tensor(0.0)
                state[ema].lerp_(sigmas[b.name], 1 - self.stat_decay)
                state[count] += 1
            if corrected and ema in state:
                out[b.name] = state[ema] / (1 - self.stat_decay ** state[count].item())
        return out

    def _refresh(self, sigmas: dict[str, torch.Tensor]) -> None:
        blocks = [b for b in self.blocks if b.name in sigmas]
        for b in self.blocks:
            if b.name not in sigmas:
                self._warn_unseen(b)
        factors = factorize([b.name for b in blocks], [sigmas[b.name] for b in blocks], self._damping)
        for b, f in zip(blocks, factors):
            state = self.state[b.weight]
            state.pop("ap_inverse" + b.state_suffix, None)
            state.pop("ap_cholesky" + b.state_suffix, None)
            kind = "ap_inverse" if f.inverse is not None else "ap_cholesky"
            state[kind + b.state_suffix] = f.inverse if f.inverse is not None else f.cholesky

    def _stored_factor_updates(self) -> dict[int, torch.Tensor]:
        updates: dict[int, torch.Tensor] = {}  # id(param) -> the gradient the base optimizer sees (M for AP blocks)
        for b in self.blocks if self.precondition else ():
            state = self.state[b.weight]
            inverse, cholesky = state.get("ap_inverse" + b.state_suffix), state.get("ap_cholesky" + b.state_suffix)
            g = b.gradient() if inverse is not None or cholesky is not None else None
            if g is None:
                continue
            factor = Factor(None if inverse is None else self._casts[b.name](inverse, g.dtype), cholesky)
            b.write(precondition(g, factor, out=b.buffer("m", g.shape, g)), updates)
        return updates

    def _apply_base(self, updates: dict[int, torch.Tensor]) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            # contiguous: M's weight part is a column slice of [M_w | m_b], and torch's fused AdamW kernel reads a
            # strided gradient as if it were dense (it scrambled every weight update of a layer with a bias)
            g = [updates.get(id(p), p.grad).contiguous() for p in params]
            states = [self.state[p] for p in params]
            kind, lr, wd = group["kind"], group["lr"], group["weight_decay"]
            if kind == "adamw":
                adamw_update(params, g, states, lr, group["betas"], group["eps"], wd)
            elif kind == "muon":
                muon_update(params, g, states, lr, group["momentum"], group["nesterov"], wd,
                            group["ns_steps"], group["ns_eps"], group["adjust_lr_fn"])
            elif kind == "adamuon":
                adamuon_update(params, g, states, lr, group["momentum"], group["nesterov"], group["betas"][1],
                               group["eps"], wd, group["ns_steps"], group["ns_eps"])
            elif kind == "signum":
                signum_update(params, g, states, lr, group["momentum"], wd)
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
            for key in saved:
                if key.split(":")[0] in AP_STATE_KEYS:  # keep float64 factors float64, float32 statistics float32
                    on_cpu = key.startswith("sigma_count")
                    self.state[p][key] = saved[key].to(device="cpu" if on_cpu else p.device,
                                                       dtype=saved[key].dtype, copy=True)
        self._step = int(state_dict.get("dopr_step", 0))
        self.skipped_steps = int(state_dict.get("dopr_skipped_steps", 0))
        self._inputs.clear()
        self._inputs.active = self._records_at(self._step)

    def remove_hooks(self) -> None:
        """Detach the forward hooks (the optimizer can no longer refresh AP after this)."""
        self._inputs.remove()


def _input_dim(block: APBlock) -> int:
    """The size of one recorded input row (without the homogeneous coordinate)."""
    w = block.weight
    if block.taps > 1:
        return w.shape[1]
    return w[0].numel()
