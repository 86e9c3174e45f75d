"""Second moments of layer inputs, recorded by forward hooks (the A-factor of K-FAC).

A preconditioned weight computes `out = W z (+ b)` for input rows z:
- nn.Linear: the rows of its input;
- a convolution in the patch form: the unfolded patches of its input (K-FAC's convention);
- a convolution in the channel form: the channel vector at every input position, weighted by the
  number of kernel taps that read the position (padding, stride and dilation decide that count);
- nn.MultiheadAttention: the query, key and value inputs of the q, k and v rows of in_proj, and the
  attention output that out_proj multiplies (recomputed: torch computes it inside one function).
DoPr preconditions the weight gradient with Sigma = (1/n) sum_i w_i z_i z_i^T (n = sum_i w_i), where
z gets a trailing 1 when the layer has a bias.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
ATTENTION_PARTS = ("q", "k", "v", "out")


def _conv_geometry(module: nn.Module, x: torch.Tensor):
    """The padded input (B, C, H, W) and kernel/stride/dilation as 2D tuples (a 1D signal is an image of height 1)."""
    is_1d = isinstance(module, nn.Conv1d)
    if x.dim() == (2 if is_1d else 3):  # unbatched input
        x = x.unsqueeze(0)
    pad = list(module._reversed_padding_repeated_twice)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if is_1d:
        x = x.unsqueeze(-2)
        pad = pad + [0, 0]
        kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    return x, kernel, stride, dilation


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows z_i (N, fan_in) that multiply a Linear's weight, or a conv's weight flattened to (out, C*k)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    x, kernel, stride, dilation = _conv_geometry(module, x)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C*k, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def channel_inputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel rows (B*positions, C) of the padded input and how many (output position, tap) pairs read each.

    sum_i w_i z_i z_i^T / sum_i w_i is the average over all taps of the patch covariance's diagonal
    blocks: every value a kernel tap multiplies counts once, padded zeros included."""
    x, kernel, stride, dilation = _conv_geometry(module, x)
    h, w = x.shape[-2:]
    out_h = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    ones = x.new_ones(1, 1, out_h, out_w)
    reads = F.conv_transpose2d(ones, x.new_ones(1, 1, *kernel), stride=stride, dilation=dilation)
    reads = F.pad(reads, (0, w - reads.shape[-1], 0, h - reads.shape[-2]))[0, 0]  # positions no tap reaches: 0
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return rows, reads.flatten().repeat(x.shape[0])


def attention_inputs(module: nn.MultiheadAttention, args, kwargs) -> dict[str, torch.Tensor]:
    """The inputs of the q, k, v rows of in_proj (one tensor when self-attention) and of out_proj."""
    names = ("query", "key", "value")
    query, key, value = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    e = module.embed_dim
    parts = {"q": query.reshape(-1, query.shape[-1]), "k": key.reshape(-1, key.shape[-1]),
             "v": value.reshape(-1, value.shape[-1])}
    if key is query:
        parts["k"] = parts["q"]
    if value is key:
        parts["v"] = parts["k"]
    if module.batch_first and query.dim() == 3:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    # out_proj's input: the attention output, recomputed with out_proj as the identity and without dropout
    # (torch computes it inside F.multi_head_attention_forward, where no hook sees it)
    separate = not module._qkv_same_embed_dim
    out, _ = F.multi_head_attention_forward(
        query, key, value, e, module.num_heads, module.in_proj_weight, module.in_proj_bias, module.bias_k,
        module.bias_v, module.add_zero_attn, 0.0, torch.eye(e, dtype=query.dtype, device=query.device), None,
        training=False, key_padding_mask=kwargs.get("key_padding_mask"), need_weights=False,
        attn_mask=kwargs.get("attn_mask"), use_separate_proj_weight=separate, q_proj_weight=module.q_proj_weight,
        k_proj_weight=module.k_proj_weight, v_proj_weight=module.v_proj_weight,
        is_causal=kwargs.get("is_causal", False))
    parts["out"] = out.reshape(-1, e)
    return parts


class InputMoments:
    """Sums over the rows z seen since the last optimizer step: sum w z z^T, sum w z and n = sum w.

    While no more than `keep_rows` unweighted rows have arrived they are kept as they are (references,
    no copy) instead of summed: same-batch AP of a layer wider than its batch uses them directly.
    """

    def __init__(self, keep_rows: int = 0):
        self.keep_rows = keep_rows
        self.zz: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.n = 0.0
        self.rows: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor | None] = []  # the output gradients of the kept rows, where recorded

    @property
    def dim(self) -> int:
        return (self.rows[0] if self.rows else self.z).shape[-1]

    def add(self, z: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if weights is None and self.zz is None and self.n + z.shape[0] <= self.keep_rows:
            self.rows.append(z)
            self.n += z.shape[0]
            return
        self.fold()
        self.deltas = []
        zw = z if weights is None else z * weights[:, None]
        if self.zz is None:  # the first sum of this step: no zero-filled accumulator to add to
            self.zz, self.z = zw.T @ z, zw.sum(0)
        else:
            self.zz.addmm_(zw.T, z)
            self.z.add_(zw.sum(0))
        self.n += z.shape[0] if weights is None else float(weights.sum())

    def fold(self) -> None:
        """Sum the kept rows into the moments."""
        if not self.rows:
            return
        z = torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]
        self.rows, self.n = [], self.n - z.shape[0]
        self.keep_rows = 0
        self.add(z)

    def keep_delta(self, index: int, grad: torch.Tensor) -> None:
        """A backward hook on the output of the call that recorded rows[index]."""
        if index < len(self.deltas):
            self.deltas[index] = grad.detach().reshape(-1, grad.shape[-1]).float()

    def delta_matrix(self) -> torch.Tensor | None:
        """The output gradients of all kept rows as one (n, out) matrix; None if any is missing."""
        if not self.rows or len(self.deltas) != len(self.rows) or any(d is None for d in self.deltas):
            return None
        return torch.cat(self.deltas) if len(self.deltas) > 1 else self.deltas[0]

    def matrix(self, homogeneous: bool) -> torch.Tensor:
        """The kept rows as one (n, d [+1]) matrix, with a column of ones when `homogeneous`."""
        z = torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]
        return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1) if homogeneous else z

    def sigma(self, homogeneous: bool) -> torch.Tensor:
        """(1/n) sum w z z^T (float32), with the homogeneous coordinate appended when asked; a new tensor."""
        if self.rows:  # one product of the rows with the ones column: the whole matrix, no copies
            z = self.matrix(homogeneous)
            return (z.T @ z).div_(self.n)
        self.fold()
        d = self.zz.shape[0]
        out = self.zz.new_empty(d + homogeneous, d + homogeneous)
        out[:d, :d] = self.zz
        if homogeneous:
            out[:d, d] = self.z
            out[d, :d] = self.z
            out[d, d] = self.n
        return out.div_(max(self.n, 1e-30))

    def tensors(self) -> list[torch.Tensor]:
        """What was recorded: non-finite exactly when some recorded input was."""
        return self.rows + ([self.zz] if self.zz is not None else [])


class InputStatistics:
    """Forward hooks on `layers` that sum input moments while `active` is set.

    Only forwards of the optimized modules that can produce a gradient count: the module in training
    mode and grad mode on, so evaluation passes, `torch.no_grad()` validation passes and deep-copied
    (EMA) models leave no trace.
    Every call of a module adds to its sums (a block called twice, gradient-accumulation
    micro-batches); the optimizer consumes and clears them at each step.
    The hooks exist only while `active`: a module with no hooks takes torch's fast call path, so the
    steps that record nothing cost nothing in the forward pass.

    Recorded moments are keyed by layer name, with ":q", ":k", ":v", ":out" for attention; `keep_rows`
    maps a key to how many unsummed rows to keep (see InputMoments).
    """

    def __init__(self, layers: dict[str, nn.Module], active: bool = False, conv: str = "patch",
                 keep_rows: dict[str, int] | None = None):
        self.layers = layers
        self.conv = conv
        self.keep_rows = keep_rows or {}
        self.moments: dict[str, InputMoments] = {}
        self.handles: list = []  # filled in place: the finalizer below holds this very list
        self._removed = False
        # The hooks hold only a weak reference: a discarded optimizer stops recording and its hooks go away.
        self._hook = partial(_call_if_alive, weakref.ref(self))
        weakref.finalize(self, _remove_handles, self.handles)
        self.active = active

    @property
    def active(self) -> bool:
        return bool(self.handles)

    @active.setter
    def active(self, value: bool) -> None:
        if value and not self.handles and not self._removed:
            self.handles.extend(m.register_forward_hook(partial(self._hook, name), with_kwargs=True)
                                for name, m in self.layers.items())
        elif not value and self.handles:
            _remove_handles(self.handles)

    def _record(self, name, module, args, kwargs, output):
        # `module is not ...`: a deepcopy of the model (an EMA copy) carries copies of these hooks
        if not (module.training and torch.is_grad_enabled()) or module is not self.layers[name]:
            return
        # statistics stay float32 under autocast and build no autograd graph
        with torch.no_grad(), torch.autocast(args[0].device.type if args else "cpu", enabled=False):
            if isinstance(module, nn.MultiheadAttention):
                memo: dict[int, torch.Tensor] = {}  # keep "key is query": detach each distinct tensor once

                def plain(t):
                    return memo.setdefault(id(t), t.detach().float()) if torch.is_tensor(t) else t
                args = tuple(plain(a) for a in args)
                kwargs = {k: plain(v) if k in ("query", "key", "value") else v for k, v in kwargs.items()}
                seen: dict[int, InputMoments] = {}
                for part, z in attention_inputs(module, args, kwargs).items():
                    # self-attention: q, k and v share one input, so one set of moments (summed once)
                    if id(z) in seen:
                        self.moments[f"{name}:{part}"] = seen[id(z)]
                    else:
                        seen[id(z)] = self._add(f"{name}:{part}", z)
                return
            x = (args[0] if args else kwargs["input"]).detach().float()
            if isinstance(module, nn.Linear):
                acc = self._add(name, layer_inputs(module, x))
                if acc.rows and output.requires_grad:  # this call's rows were kept: keep its output gradient too
                    acc.deltas.append(None)
                    output.register_hook(partial(_keep_delta_if_alive, weakref.ref(acc), len(acc.rows) - 1))
            elif self.conv == "patch":
                self._add(name, layer_inputs(module, x))
            else:
                self._add(name, *channel_inputs(module, x))

    def _add(self, key: str, z: torch.Tensor, weights: torch.Tensor | None = None) -> InputMoments:
        acc = self.moments.get(key)
        if acc is None:
            acc = self.moments[key] = InputMoments(self.keep_rows.get(key, 0))
        acc.add(z, weights)
        return acc

    def clear(self) -> None:
        self.moments = {}

    def remove(self) -> None:
        self._removed = True
        _remove_handles(self.handles)


def _call_if_alive(ref, name, module, args, kwargs, output):
    stats = ref()
    if stats is not None:
        stats._record(name, module, args, kwargs, output)


def _keep_delta_if_alive(ref, index, grad):
    acc = ref()
    if acc is not None:
        acc.keep_delta(index, grad)


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
