"""Export a checkpoint to one self-contained TorchScript or ONNX file (`dopr export`).

The exported graph takes the raw observation history, one input per key (B, To, *shape)
(float32 for low-dim keys, uint8 for images), and returns the executed actions (B, Ta, A) in raw
units: the policy's normalization is inside. Generative policies also take their sampling noise
as the input ``noise`` of shape (B, S, Tp, A), and the sampling loop is unrolled to a fixed number
of steps:
- flow matching and DDIM (eta = 0) draw noise once: S = 1, the initial sample;
- DDPM draws the initial sample and one variance noise per step with t > 0: S = 1 + that count.
The order is the order in which the policy draws from its ``generator``, so the exported file with
``noise`` filled from ``torch.randn(..., generator=g)`` reproduces ``predict_action(obs, generator=g)``.

Diffusers' scheduler ``step`` is Python over integer timesteps and draws its own noise, so it is
replaced here by plain tensor arithmetic whose coefficients are read from the same scheduler
object (``SamplingStep``); the parity tests check the two agree.

The file also carries its metadata (``deploy_meta``), which ``dopr.deploy.runtime`` reads.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dopr.atomic import atomic_path
from dopr.deploy.runtime import META_KEY, NOISE_INPUT

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18  # Mish is a native op from opset 18


def deploy_meta(policy, ckpt_meta: dict | None = None) -> dict:
    """What a controller or a client must know to feed the policy and time its actions."""
    cfg = policy.config
    ckpt_meta = ckpt_meta or {}
    control_freq = ckpt_meta.get("control_freq")  # meta.json as dopr.train writes it
    return {
        "policy": cfg.kind,
        "task": ckpt_meta.get("task"),
        "obs_keys": list(cfg.obs_shapes),
        "obs_shapes": {k: list(s) for k, s in cfg.obs_shapes.items()},
        "obs_dtypes": {k: ("uint8" if k in cfg.image_keys else "float32") for k in cfg.obs_shapes},
        "action_dim": cfg.action_dim,
        "n_obs_steps": cfg.n_obs_steps,
        "horizon": cfg.horizon,
        "n_action_steps": cfg.n_action_steps,
        "control_freq": float(control_freq) if control_freq is not None else None,
        "num_inference_steps": cfg.num_inference_steps if not cfg.is_mlp else None,
        "sampler": cfg.sampler if cfg.kind == "diffusion" else None,
        "step": ckpt_meta.get("step"),
    }


@dataclass(frozen=True)
class SamplingStep:
    """One denoising step as plain arithmetic: x0 from the model output, then the next sample.

    x0 = clamp((x - sqrt_beta * out) / sqrt_alpha) (epsilon prediction) or clamp(out) (sample prediction)
    eps = out (epsilon prediction) or (x - sqrt_alpha * x0_unclipped) / sqrt_beta (sample prediction; DDIM)
    DDPM: x' = c_x0 * x0 + c_x * x + std * noise          (std = 0 when t = 0: no noise drawn)
    DDIM: x' = c_x0 * x0 + c_eps * eps
    """

    timestep: int
    sqrt_alpha: float
    sqrt_beta: float
    c_x0: float
    c_x: float = 0.0
    c_eps: float = 0.0
    std: float = 0.0
    draws_noise: bool = False


def diffusion_steps(scheduler, num_inference_steps: int) -> list[SamplingStep]:
    """Read the coefficients of every step from a diffusers DDPMScheduler or DDIMScheduler.

    Each coefficient is computed with the same float32 tensor operations as the scheduler's
    ``step``, so the unrolled loop matches it to rounding.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; leave the policy's scheduler alone
    sched.set_timesteps(num_inference_steps)
    cfg = sched.config
    if cfg.thresholding:
        raise ValueError("export: dynamic thresholding is not supported (clip_sample is)")
    if cfg.prediction_type not in ("epsilon", "sample"):
        raise ValueError(f"export: prediction_type {cfg.prediction_type!r} is not supported (epsilon, sample)")
    is_ddpm = isinstance(sched, DDPMScheduler)
    if not is_ddpm and not isinstance(sched, DDIMScheduler):
        raise ValueError(f"export: scheduler {type(sched).__name__} is not supported (DDPM, DDIM)")
    if is_ddpm and sched.variance_type not in ("fixed_small", None):
        raise ValueError(f"export: DDPM variance_type {sched.variance_type!r} is not supported (fixed_small)")
    steps = []
    for t in sched.timesteps.tolist():
        alpha_t = sched.alphas_cumprod[t]
        beta_t = 1 - alpha_t
        if is_ddpm:
            prev_t = int(sched.previous_timestep(t))
            alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
            beta_prev = 1 - alpha_prev
            current_alpha = alpha_t / alpha_prev
            current_beta = 1 - current_alpha
            std = float(sched._get_variance(t) ** 0.5) if t > 0 else 0.0
            steps.append(SamplingStep(
                t, float(alpha_t**0.5), float(beta_t**0.5),
                c_x0=float(alpha_prev**0.5 * current_beta / beta_t),
                c_x=float(current_alpha**0.5 * beta_prev / beta_t),
                std=std, draws_noise=t > 0,
            ))
        else:
            prev_t = t - cfg.num_train_timesteps // sched.num_inference_steps
            alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            steps.append(SamplingStep(
                t, float(alpha_t**0.5), float(beta_t**0.5),
                c_x0=float(alpha_prev**0.5), c_eps=float((1 - alpha_prev) ** 0.5),
            ))
    return steps


class ExportablePolicy(nn.Module):
    """forward(*obs_in_key_order[, noise]) -> actions (B, Ta, A); traceable (fixed steps, no RNG)."""

    def __init__(self, policy, num_inference_steps: int | None = None):
        super().__init__()
        cfg = copy.deepcopy(policy.config)
        if num_inference_steps is not None and not cfg.is_mlp:
            cfg.num_inference_steps = int(num_inference_steps)
        self.policy = policy
        self.config = cfg
        self.obs_keys = list(cfg.obs_shapes)
        self.kind = cfg.kind
        self.steps: list[SamplingStep] = []
        self.clip_range: float | None = None
        self.predicts_epsilon = True
        if cfg.kind == "diffusion":
            sched = policy.sample_scheduler
            self.steps = diffusion_steps(sched, cfg.num_inference_steps)
            self.clip_range = float(sched.config.clip_sample_range) if sched.config.clip_sample else None
            self.predicts_epsilon = sched.config.prediction_type == "epsilon"
            from diffusers import DDPMScheduler

            self.is_ddpm = isinstance(sched, DDPMScheduler)

    @property
    def noise_shape(self) -> list[int] | None:
        """Per-sample shape of the ``noise`` input, or None for a deterministic policy."""
        if self.config.is_mlp:
            return None
        draws = 1 + sum(s.draws_noise for s in self.steps)
        return [draws, self.config.horizon, self.config.action_dim]

    def _denoise(self, x, cond, noise):
        draw = 1  # noise[:, 0] was the initial sample
        for step in self.steps:
            out = self.policy.model(x, torch.tensor(step.timestep), cond)
            if self.predicts_epsilon:
                eps, x0 = out, (x - step.sqrt_beta * out) / step.sqrt_alpha
            else:  # DDIM derives eps from the unclipped x0, as diffusers does
                eps, x0 = (x - step.sqrt_alpha * out) / step.sqrt_beta, out
            if self.clip_range is not None:
                x0 = x0.clamp(-self.clip_range, self.clip_range)
            if self.is_ddpm:
                x = step.c_x0 * x0 + step.c_x * x
                if step.draws_noise:
                    x = x + step.std * noise[:, draw]
                    draw += 1
            else:
                x = step.c_x0 * x0 + step.c_eps * eps
        return x

    def _flow(self, x, cond):
        from dopr.policies.unet_policy import _FLOW_TIME_SCALE

        n = self.config.num_inference_steps
        for i in range(n):
            t = torch.tensor(i / n, dtype=torch.float32) * _FLOW_TIME_SCALE
            x = x + self.policy.model(x, t, cond) / n
        return x

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        obs = dict(zip(self.obs_keys, inputs))
        start = self.config.n_obs_steps - 1
        end = start + self.config.n_action_steps
        if self.config.is_mlp:
            return self.policy.sample_chunk(obs)[:, start:end]
        noise = inputs[len(self.obs_keys)]
        cond = self.policy.encode_obs(obs)
        x = noise[:, 0]
        x = self._denoise(x, cond, noise) if self.kind == "diffusion" else self._flow(x, cond)
        return self.policy.normalizer.unnormalize("action", x)[:, start:end]

    def example_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        inputs = []
        for key in self.obs_keys:
            shape = (batch, self.config.n_obs_steps, *self.config.obs_shapes[key])
            if key in self.config.image_keys:
                inputs.append(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8))
            else:
                inputs.append(torch.randn(shape, generator=g))
        if self.noise_shape is not None:
            inputs.append(torch.randn((batch, *self.noise_shape), generator=g))
        return tuple(inputs)


def noise_like_generator(noise_shape: list[int], batch: int, generator: torch.Generator) -> torch.Tensor:
    """The noise input (B, S, Tp, A) holding exactly what ``predict_action(obs, generator)`` would draw."""
    draws = [torch.randn((batch, *noise_shape[1:]), generator=generator) for _ in range(noise_shape[0])]
    return torch.stack(draws, dim=1)


def export_policy(policy, out: str | Path, fmt: str, meta: dict, num_inference_steps: int | None = None) -> Path:
    """Trace ``policy`` (eval mode, CPU) and write it to ``out`` atomically with ``meta`` inside."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportablePolicy(policy.cpu().eval(), num_inference_steps).eval()
    meta = {**meta, "noise_shape": module.noise_shape, "format": fmt}
    if not module.config.is_mlp:
        meta["num_inference_steps"] = module.config.num_inference_steps
    example = module.example_inputs()
    names = module.obs_keys + ([NOISE_INPUT] if module.noise_shape is not None else [])
    # the tracer warns about every Python-int shape check in the policy; the graph is fixed by design
    with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, tmp, _extra_files={META_KEY: json.dumps(meta)})
        else:
            _export_onnx(module, example, names, Path(tmp), meta)
    return out


def _export_onnx(module, example, names, path: Path, meta: dict) -> None:
    import onnx

    batch_axis = {name: {0: "batch"} for name in [*names, "action"]}
    # dynamo=False: the TorchScript-based exporter needs no onnxscript and handles the unrolled loop
    torch.onnx.export(module, example, str(path), dynamo=False, input_names=names, output_names=["action"],
                      dynamic_axes=batch_axis, opset_version=ONNX_OPSET)
    model = onnx.load(str(path))
    prop = model.metadata_props.add()
    prop.key, prop.value = META_KEY, json.dumps(meta)
    onnx.save(model, str(path))


def export_checkpoint(ckpt_dir: str | Path, out: str | Path, fmt: str, ema: bool = True,
                      num_inference_steps: int | None = None) -> Path:
    """``dopr export``: load a checkpoint folder and write one exported file."""
    from dopr.policies import load_checkpoint_meta, load_policy

    policy = load_policy(ckpt_dir, ema=ema, device="cpu")
    meta = deploy_meta(policy, load_checkpoint_meta(ckpt_dir))
    return export_policy(policy, out, fmt, meta, num_inference_steps)
