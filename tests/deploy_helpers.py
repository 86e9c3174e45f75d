"""A small MLP checkpoint the policy-server tests serve (random weights, seeded; ranges from -2..-1 to 1..2)."""

from __future__ import annotations

import numpy as np
import torch

OBS_SHAPES = {"robot0_eef_pos": [3], "object": [5]}


def small_mlp_checkpoint(folder):
    from dopr.policies import PolicyConfig, build_policy, save_checkpoint

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = PolicyConfig(kind="mlp", obs_shapes=OBS_SHAPES, action_dim=3, n_obs_steps=2, horizon=6, n_action_steps=3,
                       mlp_hidden_dim=32)
    stats = {k: {"min": rng.uniform(-2, -1, d), "max": rng.uniform(1, 2, d), "mean": np.zeros(d), "std": np.ones(d)}
             for k, d in {"robot0_eef_pos": 3, "object": 5, "action": 3}.items()}
    return save_checkpoint(folder, build_policy(cfg, stats), meta={"step": 1, "task": "lift", "control_freq": 20.0})
