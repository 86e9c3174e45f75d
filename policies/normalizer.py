"""Per-key affine normalization whose statistics are buffers, so they travel with the policy's weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# A feature whose range (or std) is below this is constant in the data: it is only shifted,
# never divided by ~0 (a constant gripper joint would otherwise blow up to 1e8 at test time).
_EPS = 1e-4


def module_name(key: str) -> str:
    """A data key as a submodule name: torch forbids '.' there, and LeRobot's keys have it
    (observation.state); keys without a dot keep their state-dict names."""
    return key.replace(".", "-")


def module_dict(modules: dict[str, nn.Module]) -> nn.ModuleDict:
    """nn.ModuleDict of modules named by data key (see module_name); index it with module_name(key)."""
    names = [module_name(k) for k in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"keys {sorted(modules)} give the same module name once '.' is written '-'")
    return nn.ModuleDict(dict(zip(names, modules.values())))


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
        self.keys = list(dims)
        self.params = module_dict({key: _Affine(dim) for key, dim in dims.items()})
        if stats is not None:
            self.set_stats(stats)

    def set_stats(self, stats: dict) -> None:
        for key in self.keys:
            affine = self.params[module_name(key)]
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
        p = self.params[module_name(key)]
        return x * p.scale + p.offset

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        p = self.params[module_name(key)]
        return (y - p.offset) / p.scale
