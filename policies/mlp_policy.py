"""MLP behavior cloning: observation history (To steps) -> action chunk (Tp steps), MSE in normalized units.

kind "mlp" is a plain MLP (mlp_layers hidden layers); kind "resmlp" the residual MLP of
dopr.policies.residual_mlp (mlp_layers pre-activation blocks). Loss and sampling are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dopr.policies.config import PolicyConfig
from dopr.policies.policy import Policy
from dopr.policies.residual_mlp import ResidualMLP


class MLPPolicy(Policy):
    def __init__(self, config: PolicyConfig, stats: dict | None = None):
        super().__init__(config, stats)
        out_dim = config.horizon * config.action_dim
        if config.kind == "resmlp":
            self.net = ResidualMLP(self.obs_encoder.output_dim, out_dim, config.mlp_hidden_dim, config.mlp_layers,
                                   layer_norm=config.mlp_layer_norm)
            return
        layers, width = [], self.obs_encoder.output_dim
        for _ in range(config.mlp_layers):
            layers += [nn.Linear(width, config.mlp_hidden_dim), nn.Mish()]
            width = config.mlp_hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def _predict_normalized(self, obs: dict) -> torch.Tensor:
        cfg = self.config
        return self.net(self.encode_obs(obs)).reshape(-1, cfg.horizon, cfg.action_dim)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        target = self._check_action(batch["action"])
        return F.mse_loss(self._predict_normalized(batch["obs"]), target)

    @torch.no_grad()
    def sample_chunk(self, obs: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.normalizer.unnormalize("action", self._predict_normalized(obs))
