"""Which windows make up the batch of a training step, and moving a batch to the device."""

from __future__ import annotations

import numpy as np


class StepBatches:
    """The window indices of global batch `step`: epoch-wise permutations seeded by (seed, epoch).

    Sample position p = step * batch_size + j lies in epoch p // n at place p % n of that epoch's
    permutation. Every window is seen once per epoch, and no iterator state needs saving: a resumed
    run asks for step s and gets exactly the batch the uninterrupted run had.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("the training split has no windows")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, places = pos // self.n, pos % self.n
        return np.concatenate([self._perm(int(e))[places[epochs == e]] for e in np.unique(epochs)])


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
