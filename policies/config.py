"""Policy configuration: everything needed to rebuild a policy's modules from a checkpoint's config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

POLICY_KINDS = ("mlp", "resmlp", "diffusion", "flow")
# one forward pass maps observations to the action chunk (no sampling loop)
MLP_KINDS = ("mlp", "resmlp")
NORM_MODES = ("limits", "gaussian")  # low-dim keys and actions: to [-1, 1], or to zero mean and unit std


@dataclass
class PolicyConfig:
    kind: str  # "mlp", "resmlp" (residual MLP), "diffusion" or "flow" (the last two share the UNet)
    obs_shapes: dict[str, list[int]]  # per-step shape of every observation key; (H, W, 3) marks an image
    action_dim: int
    n_obs_steps: int = 2  # To: observation history
    horizon: int = 16  # Tp: predicted action chunk
    n_action_steps: int = 8  # Ta: executed actions, action[To-1 : To-1+Ta]
    norm_mode: str = "limits"  # low-dim keys and actions: "limits" -> [-1, 1], "gaussian" -> zero mean, unit std
    # image encoder (images are uint8 (H, W, 3); the encoder scales them to [0, 1])
    image_feature_dim: int = 64
    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    crop_ratio: float = 0.9  # random crop of this fraction of H and W in training, center crop at inference
    # MLP policy (kind "mlp": mlp_layers hidden layers; kind "resmlp": mlp_layers residual blocks)
    mlp_hidden_dim: int = 256
    mlp_layers: int = 3
    mlp_layer_norm: bool = True  # resmlp: LayerNorm inside every residual block and before the head
    # UNet policy (diffusion_policy's low-dim recipe)
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    timestep_embed_dim: int = 256
    num_train_timesteps: int = 100  # DDPM
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    sampler: str = "ddpm"  # diffusion sampling: "ddpm" or "ddim"
    num_inference_steps: int = 100  # diffusion: DDPM/DDIM steps; flow: Euler steps

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy kind must be one of {POLICY_KINDS}, got {self.kind!r}")
        if self.norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {self.norm_mode!r}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if not self.obs_shapes:
            raise ValueError("a policy needs at least one observation key")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"To-1+Ta = {self.n_obs_steps - 1 + self.n_action_steps} exceeds the horizon Tp = {self.horizon}"
            )
        self.obs_shapes = {k: [int(d) for d in v] for k, v in self.obs_shapes.items()}
        self.image_channels = [int(c) for c in self.image_channels]
        self.down_dims = [int(d) for d in self.down_dims]

    @property
    def is_mlp(self) -> bool:
        """An MLP kind: the action chunk is one forward pass (deterministic, no inference steps)."""
        return self.kind in MLP_KINDS

    @property
    def image_keys(self) -> list[str]:
        return [k for k, s in self.obs_shapes.items() if is_image_shape(s)]

    @property
    def lowdim_keys(self) -> list[str]:
        return [k for k, s in self.obs_shapes.items() if not is_image_shape(s)]

    @property
    def lowdim_dims(self) -> dict[str, int]:
        """Features per step of each low-dim key (a (D,) vector; a scalar counts as 1)."""
        return {k: int(np.prod(self.obs_shapes[k])) if self.obs_shapes[k] else 1 for k in self.lowdim_keys}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown policy config fields {unknown}")
        return cls(**d)


def is_image_shape(shape) -> bool:
    """Images are stored as (H, W, 3) uint8 per step; everything else is a low-dim vector."""
    return len(shape) == 3 and shape[-1] == 3
