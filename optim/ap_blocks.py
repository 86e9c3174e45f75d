"""Which weights get activation-wise preconditioning (AP), and how each gradient meets its Sigma.

An AP block is a weight (or some rows of it) whose gradient g, reshaped to (rows, d), is
preconditioned as M = [g | g_b] (Sigma + delta I)^-1 with Sigma the covariance of its recorded
inputs (d x d, or (d+1) x (d+1) with the bias as the homogeneous coordinate).

The invariance principle (Zhang et al. 2026) gives every block: transform the layer's input by an
invertible A, the same A at every position or token, and the weights by the inverse, so the output is
unchanged; AP is the update whose effect on the output does not depend on A.
- nn.Linear: z -> A z, W -> W A^-1: M = g Sigma^-1.
- Convolution, channel form: A acts on the C channels at every input position, so every kernel tap
  j's weight W_j (out x C) transforms as W_j A^-1 and M_j = g_j Sigma_c^-1, one (C [+1])^2 matrix for
  all taps. Sigma_c averages x x^T over every (output position, tap) read, padded zeros included.
  The bias: out_p = sum_j W_j x_{p,j} + b. Write the augmented channel vector x~ = [x; 1] and split
  the bias over the taps, b = sum_j c_j, so out_p = sum_j [W_j | c_j] x~_{p,j}: every tap is a Linear
  layer on x~ and the shared affine transform x -> A x + a (A~ = [[A, a], [0, 1]]) keeps the output
  when each [W_j | c_j] -> [W_j | c_j] A~^-1. Then dL/dc_j = g_b for every j, the invariant update
  of tap j is [m_j | m_b,j] = [g_j | g_b] Sigma~_c^-1, and the bias moves by sum_j m_b,j. (Averaging
  instead of summing, or giving each tap g_b / k, breaks invariance under the shift a.)
  With k = 1 this is exactly the Linear form.
- Convolution, patch form: the K-FAC patch covariance ((C k [+1])^2): z = the unfolded patch.
- nn.MultiheadAttention: the q, k and v rows of in_proj are three Linear maps of the query, key and
  value inputs (one input in self-attention, so one Sigma); out_proj is a Linear map of the attention
  output. Attention built from nn.Linear modules is covered by the Linear form as it is.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .activation_stats import ATTENTION_PARTS, SUPPORTED_LAYERS


@dataclass(eq=False)
class APBlock:
    name: str  # "enc.0", or "enc.attn:q" for a part of an attention layer
    stats_key: str  # the recorded inputs whose Sigma preconditions this block
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    part: slice | None = None  # the output rows of weight (and bias) this block owns; None: all
    taps: int = 1  # the channel form: kernel taps that share one channel covariance
    state_suffix: str = ""  # this block's factors live in state[weight]["ap_inverse" + suffix]
    # Per-step temporaries of the weight's size, kept between steps: a fresh multi-MB tensor every step costs
    # page faults (the allocator returns freed memory to the OS); 2x the step's copies on the CPU UNet.
    workspace: dict = field(default_factory=dict, repr=False)

    @property
    def homogeneous(self) -> bool:
        return self.bias is not None

    def buffer(self, key: str, shape, like: torch.Tensor) -> torch.Tensor:
        buf = self.workspace.get(key)
        if buf is None or buf.shape != torch.Size(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.workspace[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _grads(self):
        g = self.weight.grad
        if g is None:
            return None, None
        g_b = None
        if self.bias is not None:
            g_b = self.bias.grad if self.bias.grad is not None else torch.zeros(self.bias.shape, dtype=g.dtype,
                                                                                 device=g.device)
        if self.part is not None:
            g, g_b = g[self.part], (None if g_b is None else g_b[self.part])
        return g, g_b

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(g as (out, d), g_b or None) of a block with one tap (no copies); None when the weight has no gradient."""
        assert self.taps == 1
        g, g_b = self._grads()
        return None if g is None else (g.reshape(g.shape[0], -1), g_b)

    def gradient(self) -> torch.Tensor | None:
        """[g | g_b] as (out * taps, d [+1]), one row per (output channel, tap); None when the weight has no
        gradient. One pass over the gradient into a kept buffer."""
        g, g_b = self._grads()
        if g is None:
            return None
        out = g.shape[0]
        if self.taps == 1 and g_b is None:
            return g.reshape(out, -1)
        d = g[0].numel() // self.taps
        full = self.buffer("g~", (out * self.taps, d + self.homogeneous), g)
        full[:, :d].view(out, self.taps, d).copy_(g.reshape(out, d, self.taps).transpose(1, 2))
        if g_b is not None:
            full[:, d].view(out, self.taps).copy_(g_b[:, None].expand(out, self.taps))
        return full

    def write(self, m: torch.Tensor, updates: dict[int, torch.Tensor]) -> None:
        """Put M = [m_w | m_b]'s parts where the base optimizer reads them (updates[id(param)])."""
        d = m.shape[1] - self.homogeneous
        self.write_parts(m[:, :d], m[:, d] if self.homogeneous else None, updates)

    def write_parts(self, m_w: torch.Tensor, m_b: torch.Tensor | None, updates: dict[int, torch.Tensor]) -> None:
        if self.taps > 1:
            shape = self.weight.shape if self.part is None else self.weight[self.part].shape
            back = self.buffer("m_w", shape, m_w)
            back.view(shape[0], -1, self.taps).copy_(m_w.reshape(shape[0], self.taps, -1).transpose(1, 2))
            m_w = back
        self._put(self.weight, m_w, updates)
        if m_b is not None:
            self._put(self.bias, m_b if self.taps == 1 else m_b.reshape(-1, self.taps).sum(1), updates)

    def _put(self, param, value, updates) -> None:
        if self.part is None:
            updates[id(param)] = value.reshape(param.shape)
            return
        if id(param) not in updates:  # rows no block owns keep their gradient
            updates[id(param)] = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        updates[id(param)][self.part] = value.reshape(updates[id(param)][self.part].shape)


def _is_excluded(exclude, name: str, module: nn.Module) -> bool:
    if callable(exclude):
        return bool(exclude(name, module))
    return any(
        (item is module) if isinstance(item, nn.Module) else fnmatch.fnmatchcase(name, item) for item in exclude
    )


def _trainable(p) -> nn.Parameter | None:
    return p if p is not None and p.requires_grad else None


def find_blocks(model: nn.Module, exclude=(), conv: str = "channel") -> tuple[list[APBlock], dict[str, nn.Module]]:
    """The AP blocks of `model` and the modules whose forward hooks record their inputs."""
    blocks: list[APBlock] = []
    hooked: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS) or id(module) in seen:
            continue
        if _is_excluded(exclude, name, module):
            continue
        if isinstance(module, nn.MultiheadAttention):
            seen.add(id(module.out_proj))  # called functionally inside the attention: no hook of its own fires
            found = _attention_blocks(name, module)
        else:
            found = _layer_blocks(name, module, conv)
        found = [b for b in found if b.weight.requires_grad and id(b.weight) not in seen]
        seen.update(id(b.weight) for b in found if b.part is None)
        if found:
            blocks += found
            hooked[name] = module
    return blocks, hooked


def _layer_blocks(name: str, module: nn.Module, conv: str) -> list[APBlock]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            warnings.warn(f"DoPr: conv layer '{name}' has groups={module.groups}; it gets no AP (base optimizer only)")
            return []
        taps = module.weight[0, 0].numel() if conv == "channel" else 1
        return [APBlock(name, name, module, module.weight, _trainable(module.bias), taps=taps)]
    return [APBlock(name, name, module, module.weight, _trainable(module.bias))]


def _attention_blocks(name: str, attn: nn.MultiheadAttention) -> list[APBlock]:
    e, bias = attn.embed_dim, _trainable(attn.in_proj_bias)
    blocks = []
    for i, part in enumerate(ATTENTION_PARTS[:3]):
        rows = slice(i * e, (i + 1) * e)
        if attn._qkv_same_embed_dim:
            weight, weight_rows = attn.in_proj_weight, rows
        else:  # kdim/vdim != embed_dim: separate q, k, v weights, one bias
            weight, weight_rows = getattr(attn, f"{part}_proj_weight"), None
        if weight_rows is None and bias is not None:
            # a block owns the same rows of its weight and bias; this layout has none to share
            warnings.warn(f"DoPr: attention '{name}' has separate q/k/v weights and a bias; its {part} rows get no AP")
            continue
        blocks.append(APBlock(f"{name}:{part}", f"{name}:{part}", attn, weight, bias, weight_rows,
                              state_suffix=f":{part}"))
    out = attn.out_proj
    blocks.append(APBlock(f"{name}:out", f"{name}:out", attn, out.weight, _trainable(out.bias)))
    return blocks
