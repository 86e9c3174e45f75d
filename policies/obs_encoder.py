"""Turns an observation history (low-dim keys and images together) into one conditioning vector."""

from __future__ import annotations

import torch
from torch import nn

from dopr.policies.config import PolicyConfig
from dopr.policies.image_encoder import ImageEncoder
from dopr.policies.normalizer import Normalizer, module_dict, module_name


class ObsEncoder(nn.Module):
    """obs[key] (B, To, ...) raw -> (B, To * feature_dim).

    The policy owns the normalizer (one set of buffers for observations and actions) and passes it in.
    Low-dim keys are normalized and concatenated in config order; each image key has its own
    encoder (cameras see different things). Features of all To steps are flattened, as in
    diffusion_policy's global conditioning.
    """

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.image_encoders = module_dict(
            {
                key: ImageEncoder(config.obs_shapes[key], config.image_feature_dim, config.image_channels,
                                  config.crop_ratio)
                for key in config.image_keys
            }
        )
        lowdim = sum(config.lowdim_dims.values())
        self.step_dim = lowdim + config.image_feature_dim * len(config.image_keys)
        self.output_dim = self.step_dim * config.n_obs_steps

    def forward(self, obs: dict[str, torch.Tensor], normalizer: Normalizer) -> torch.Tensor:
        cfg = self.config
        parts = []
        batch = None
        for key in cfg.obs_shapes:
            if key not in obs:
                raise KeyError(f"observation key {key!r} missing (policy expects {list(cfg.obs_shapes)}, "
                               f"got {sorted(obs)})")
            x = obs[key]
            if x.shape[1] < cfg.n_obs_steps:
                raise ValueError(f"observation {key!r} has {x.shape[1]} steps, the policy needs To = {cfg.n_obs_steps}")
            x = x[:, -cfg.n_obs_steps :]  # callers may pass a longer window (a dataset window of Tp steps)
            batch = x.shape[0]
            if key in cfg.image_keys:
                encoder = self.image_encoders[module_name(key)]
                feats = encoder(x.reshape(-1, *x.shape[2:])).reshape(batch, cfg.n_obs_steps, -1)
            else:
                feats = normalizer.normalize(key, x.float().reshape(batch, cfg.n_obs_steps, -1))
            parts.append(feats)
        return torch.cat(parts, dim=-1).reshape(batch, -1)
