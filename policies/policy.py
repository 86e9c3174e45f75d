"""The Policy interface every stage after training codes against."""

from __future__ import annotations

import torch
from torch import nn

from dopr.policies.config import PolicyConfig
from dopr.policies.normalizer import Normalizer
from dopr.policies.obs_encoder import ObsEncoder


class Policy(nn.Module):
    """A behavior-cloning policy over action chunks.

    - `compute_loss(batch, generator=None) -> scalar`: batch = {"obs": {key: (B, To, ...)}, "action": (B, Tp, A)},
      raw (unnormalized) values as SequenceDataset yields them. `generator` fixes any noise the
      loss draws (validation passes one so numbers compare across checkpoints).
    - `predict_action(obs, generator=None) -> (B, Ta, A)`: the executed part of the chunk,
      action[To-1 : To-1+Ta], in raw action units.
    - `reset()`: forget per-episode state (none here: the caller keeps the observation history).
    `forward(batch)` is `compute_loss(batch)` so DistributedDataParallel can wrap a policy.
    Normalization statistics are buffers of `self.normalizer`, so the state dict alone can act.
    """

    def __init__(self, config: PolicyConfig, stats: dict | None = None):
        super().__init__()
        self.config = config
        self.normalizer = Normalizer({**config.lowdim_dims, "action": config.action_dim}, stats, mode=config.norm_mode)
        self.obs_encoder = ObsEncoder(config)

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample_chunk(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The whole predicted chunk (B, Tp, A) in raw action units."""
        raise NotImplementedError

    @torch.no_grad()
    def predict_action(self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        start = self.config.n_obs_steps - 1
        return self.sample_chunk(obs, generator)[:, start : start + self.config.n_action_steps]

    def reset(self) -> None:
        pass

    def encode_obs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.obs_encoder(obs, self.normalizer)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.compute_loss(batch)

    def _check_action(self, action: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if action.ndim != 3 or action.shape[1] != cfg.horizon or action.shape[2] != cfg.action_dim:
            raise ValueError(
                f"batch['action'] has shape {tuple(action.shape)}, expected (B, Tp={cfg.horizon}, A={cfg.action_dim})"
            )
        return self.normalizer.normalize("action", action.float())
