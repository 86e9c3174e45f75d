"""A small ResNet-style image encoder (torchvision has no CPU wheel here) and random-crop augmentation.

GroupNorm instead of BatchNorm: batch statistics break under EMA weights and tiny per-rank
batches, as diffusion_policy found for its robomimic image policies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def random_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An independent random (height, width) crop of every image in (N, C, H, W), drawn from torch's global RNG."""
    n, c, h, w = images.shape
    top = torch.randint(0, h - height + 1, (n,), device=images.device)
    left = torch.randint(0, w - width + 1, (n,), device=images.device)
    rows = (top[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return images[batch, channel, rows, cols]


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                               nn.GroupNorm(min(groups, out_ch), out_ch))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ImageEncoder(nn.Module):
    """uint8 (N, H, W, 3) -> (N, feature_dim): crop, scale to [0, 1], stem, one residual block per stage,
    average pool."""

    def __init__(self, image_shape, feature_dim: int = 64, channels=(32, 64, 128), crop_ratio: float = 0.9):
        super().__init__()
        h, w, _ = image_shape
        self.crop_hw = (max(1, int(round(h * crop_ratio))), max(1, int(round(w * crop_ratio))))
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.GroupNorm(min(8, channels[0]), channels[0]), nn.ReLU()
        )
        stages, in_ch = [], channels[0]
        for out_ch in channels:
            stages.append(BasicBlock(in_ch, out_ch, stride=2))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if self.training:
            x = random_crop(x, *self.crop_hw)
        else:
            x = center_crop(x, *self.crop_hw)
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(-2, -1)))
