"""Generative action-chunk policy on the 1D conv UNet, trained by diffusion (DDPM) or flow matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dopr.policies.config import PolicyConfig
from dopr.policies.policy import Policy
from dopr.policies.unet1d import ConditionalUnet1D

# Flow time t in [0, 1] is fed to the same sinusoidal embedding as DDPM's integer steps;
# scaling it to the DDPM range keeps the embedding's frequencies equally useful for both.
_FLOW_TIME_SCALE = 100.0


class UnetPolicy(Policy):
    """objective = config.kind: "diffusion" (epsilon prediction, DDPM or DDIM sampling through
    diffusers' schedulers) or "flow" (linear path x_t = (1-t) x0 + t x1 from noise x0 to the
    action x1, velocity target x1 - x0, Euler integration). Sampling steps: config.num_inference_steps.
    """

    def __init__(self, config: PolicyConfig, stats: dict | None = None):
        super().__init__(config, stats)
        if config.kind not in ("diffusion", "flow"):
            raise ValueError(f"UnetPolicy objective must be 'diffusion' or 'flow', got {config.kind!r}")
        factor = 2 ** (len(config.down_dims) - 1)
        if config.horizon % factor:
            raise ValueError(f"horizon Tp = {config.horizon} must be divisible by {factor} for down_dims "
                             f"{config.down_dims}")
        self.model = ConditionalUnet1D(
            input_dim=config.action_dim,
            global_cond_dim=self.obs_encoder.output_dim,
            timestep_embed_dim=config.timestep_embed_dim,
            down_dims=config.down_dims,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
        )
        if config.kind == "diffusion":
            from diffusers import DDIMScheduler, DDPMScheduler

            kwargs = dict(
                num_train_timesteps=config.num_train_timesteps,
                beta_schedule=config.beta_schedule,
                clip_sample=True,  # actions are normalized to [-1, 1]
                prediction_type=config.prediction_type,
            )
            self.train_scheduler = DDPMScheduler(**kwargs)
            self.sample_scheduler = (DDIMScheduler if config.sampler == "ddim" else DDPMScheduler)(**kwargs)

    def _noise(self, shape, generator, device) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x1 = self._check_action(batch["action"])
        cond = self.encode_obs(batch["obs"])
        b, dev = x1.shape[0], x1.device
        noise = self._noise(x1.shape, generator, dev)
        if self.config.kind == "diffusion":
            t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=dev)
            noisy = self.train_scheduler.add_noise(x1, noise, t)
            pred = self.model(noisy, t, cond)
            target = noise if self.config.prediction_type == "epsilon" else x1
            return F.mse_loss(pred, target)
        t = torch.rand((b,), generator=generator, device=dev)
        xt = (1 - t[:, None, None]) * noise + t[:, None, None] * x1
        pred = self.model(xt, t * _FLOW_TIME_SCALE, cond)
        return F.mse_loss(pred, x1 - noise)

    @torch.no_grad()
    def sample_chunk(self, obs: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        cond = self.encode_obs(obs)
        b, dev = cond.shape[0], cond.device
        x = self._noise((b, cfg.horizon, cfg.action_dim), generator, dev)
        if cfg.kind == "diffusion":
            scheduler = self.sample_scheduler
            scheduler.set_timesteps(cfg.num_inference_steps)
            for t in scheduler.timesteps:
                out = self.model(x, t.to(dev), cond)
                x = scheduler.step(out, t, x, generator=generator).prev_sample
        else:
            n = cfg.num_inference_steps
            for i in range(n):
                t = torch.full((b,), i / n, device=dev)
                x = x + self.model(x, t * _FLOW_TIME_SCALE, cond) / n
        return self.normalizer.unnormalize("action", x)
