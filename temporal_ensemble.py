"""ACT's temporal ensembling of action chunks (Zhao et al. 2023), one implementation for the evaluator's
rollout workers (`dopr eval --temporal-ensemble`) and the controller-side runtime (dopr.deploy.runtime).

A top-level helper, not a part of policies/: both users must stay light (a simulator worker imports no
torch; the runtime is copied next to a robot's controller), and dopr.policies imports torch. numpy only.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class TemporalEnsembler:
    """Blend every chunk's prediction for the current tick.

    ``update(chunk)`` takes the chunk (Ta, A) predicted at this tick and returns the action to
    execute now. A chunk predicted i ticks ago contributes its row i; weights are ``exp(-decay * j)``
    with j = 0 for the oldest chunk still covering this tick (ACT's convention): decay 0 is the plain
    mean, a larger decay leans on the older predictions, a negative one on the newer.
    """

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.reset()

    def reset(self) -> None:
        """Forget the chunks (a new episode)."""
        self._chunks: deque[np.ndarray] = deque()  # oldest first; chunk j was made len-1-j ticks ago

    def update(self, chunk: np.ndarray) -> np.ndarray:
        self._chunks.append(np.asarray(chunk))
        # keep only the chunks that still hold a row for this tick
        while len(self._chunks[0]) < len(self._chunks):
            self._chunks.popleft()
        n = len(self._chunks)
        rows = np.stack([c[n - 1 - j] for j, c in enumerate(self._chunks)])
        weights = np.exp(-self.decay * np.arange(n))
        return (weights[:, None] * rows).sum(0) / weights.sum()
