"""Behavior-cloning policies (MLP, diffusion/flow UNet), their encoders and checkpoints."""

from dopr.policies.checkpoint import (
    CheckpointError,
    build_policy,
    load_checkpoint_meta,
    load_policy,
    save_checkpoint,
)
from dopr.policies.config import PolicyConfig
from dopr.policies.mlp_policy import MLPPolicy
from dopr.policies.normalizer import Normalizer
from dopr.policies.policy import Policy
from dopr.policies.unet_policy import UnetPolicy

__all__ = [
    "CheckpointError",
    "MLPPolicy",
    "Normalizer",
    "Policy",
    "PolicyConfig",
    "UnetPolicy",
    "build_policy",
    "load_checkpoint_meta",
    "load_policy",
    "save_checkpoint",
]
