"""A residual MLP trunk: the architecture of the DoPr paper's Humanoid behavior cloning.

    x -> Linear(in, W) -> [block] * n -> (LayerNorm) -> Mish -> Linear(W, out)
    block(h) = h + Linear(W, W)(Mish(Linear(W, W)(Mish(LayerNorm(h)))))

Pre-activation blocks (He et al. 2016, "Identity mappings in deep residual networks"): the skip
path carries h unchanged, so depth does not shrink the gradient that reaches the input layer, and
the normalization sits inside the residual branch where it cannot rescale the skip. Every weight is
an nn.Linear, so DoPr preconditions all of them; LayerNorm's gain and bias get only the base update.
"""

from __future__ import annotations

from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, width: int, layer_norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.Mish()

    def forward(self, h):
        return h + self.fc2(self.act(self.fc1(self.act(self.norm(h)))))


class ResidualMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, width: int, blocks: int, layer_norm: bool = True):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*[ResidualBlock(width, layer_norm) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.act = nn.Mish()
        self.out = nn.Linear(width, out_dim)

    def forward(self, x):
        return self.out(self.act(self.norm(self.blocks(self.inp(x)))))
