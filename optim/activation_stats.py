"""Second moments of layer inputs, recorded by forward hooks (the A-factor of K-FAC).

A supported layer computes `out = W z (+ b)` for input rows z: the rows of a Linear's input, or
the unfolded patches of a convolution's input (K-FAC's convention). DoPr preconditions the weight
gradient with Sigma = (1/n) sum_i z_i z_i^T, where z gets a trailing 1 when the layer has a bias.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows z_i (N, fan_in) that multiply the layer's weight flattened to (out, fan_in)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    is_1d = isinstance(module, nn.Conv1d)
    if x.dim() == (2 if is_1d else 3):  # unbatched input
        x = x.unsqueeze(0)
    pad = list(module._reversed_padding_repeated_twice)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if is_1d:  # unfold only handles 2D images: a 1D signal is an image of height 1
        x = x.unsqueeze(-2)
        pad = pad + [0, 0]
        kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C*k, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class InputMoments:
    """Running sums over the rows z seen since the last optimizer step: z^T z, sum z, count."""

    zz: torch.Tensor
    z: torch.Tensor
    n: int = 0

    def sigma(self, homogeneous: bool) -> torch.Tensor:
        """(1/n) sum z z^T (float32), with the homogeneous coordinate appended when asked."""
        d = self.zz.shape[0]
        out = self.zz.new_empty(d + homogeneous, d + homogeneous)
        out[:d, :d] = self.zz
        if homogeneous:
            out[:d, d] = self.z
            out[d, :d] = self.z
            out[d, d] = self.n
        return out.div_(max(self.n, 1))


class InputStatistics:
    """Forward hooks on `layers` that sum input moments while `active` is set.

    Only forwards of the optimized modules that can produce a gradient count: the module in training
    mode and grad mode on, so evaluation passes, `torch.no_grad()` validation passes and deep-copied
    (EMA) models leave no trace.
    Every call of a module adds to its sums (a block called twice, gradient-accumulation
    micro-batches); the optimizer consumes and clears them at each step.
    The hooks exist only while `active`: a module with no hooks takes torch's fast call path, so the
    steps that record nothing cost nothing in the forward pass.
    """

    def __init__(self, layers: dict[str, nn.Module], active: bool = False):
        self.layers = layers
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
        x = args[0] if args else kwargs["input"]
        # statistics stay float32 under autocast and build no autograd graph
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            z = layer_inputs(module, x.detach().float())
            acc = self.moments.get(name)
            if acc is None:  # the first call of this step: no zero-filled accumulator to add to
                self.moments[name] = InputMoments(z.T @ z, z.sum(0), z.shape[0])
            else:
                acc.zz.addmm_(z.T, z)
                acc.z.add_(z.sum(0))
                acc.n += z.shape[0]

    def clear(self) -> None:
        self.moments = {}

    def remove(self) -> None:
        self._removed = True
        _remove_handles(self.handles)


def _call_if_alive(ref, name, module, args, kwargs, output):
    stats = ref()
    if stats is not None:
        stats._record(name, module, args, kwargs, output)


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
