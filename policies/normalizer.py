"""Per-key affine normalization whose statistics are buffers, so they travel with the policy's weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# A feature whose range (or std) is below this is constant in the data: it is only shifted,
# never divided by ~0 (a constant gripper joint would otherwise blow up to 1e8 at test time).
_EPS = 1e-4


class _Affine(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))


class Normalizer(nn.Module):
    """y = x * scale + offset per key and feature.

    mode "limits" maps the data's [min, max] to [-1, 1] (what the diffusion objective's clipping
    expects); "gaussian" maps to zero mean and unit std. Statistics come from `compute_stats` on the
    train split; a freshly built Normalizer (stats=None) is the identity until a state dict is loaded.
    """

    def __init__(self, dims: dict[str, int], stats: dict | None = None, mode: str = "limits"):
        super().__init__()
        self.mode = mode
        self.params = nn.ModuleDict({key: _Affine(dim) for key, dim in dims.items()})
        if stats is not None:
            self.set_stats(stats)

    def set_stats(self, stats: dict) -> None:
        for key, affine in self.params.items():
            if key not in stats:
                raise KeyError(f"normalizer: no statistics for key {key!r} (have {sorted(stats)})")
            s = {name: np.asarray(v, dtype=np.float64).reshape(-1) for name, v in stats[key].items()}
            if self.mode == "limits":
                lo, hi = s["min"], s["max"]
                span = hi - lo
                constant = span < _EPS
                scale = np.where(constant, 1.0, 2.0 / np.where(constant, 1.0, span))
                offset = np.where(constant, -lo, -1.0 - lo * scale)
            else:
                mean, std = s["mean"], s["std"]
                constant = std < _EPS
                scale = np.where(constant, 1.0, 1.0 / np.where(constant, 1.0, std))
                offset = -mean * scale
            if scale.shape[0] != affine.scale.shape[0]:
                raise ValueError(
                    f"normalizer: statistics of {key!r} have {scale.shape[0]} features, the policy expects "
                    f"{affine.scale.shape[0]}"
                )
            affine.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
            affine.offset.copy_(torch.as_tensor(offset, dtype=torch.float32))

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        p = self.params[key]
        return x * p.scale + p.offset

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        p = self.params[key]
        return (y - p.offset) / p.scale
