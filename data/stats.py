"""Normalizer statistics per key: min, max, mean and std per feature, over chosen episodes."""

from __future__ import annotations

import numpy as np


def _runs(store, episode_indices) -> list[tuple[int, int]]:
    """Step ranges covering the episodes, consecutive episodes merged so reads are large."""
    runs: list[tuple[int, int]] = []
    for i in np.sort(np.asarray(episode_indices, dtype=np.int64)):
        start, end = store.episode_range(int(i))
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def compute_stats(store, keys, episode_indices=None, max_read_steps: int = 65536) -> dict[str, dict[str, np.ndarray]]:
    """{key: {"min", "max", "mean", "std"}} as float32 arrays of the per-step shape (reduced over
    time only), over the steps of `episode_indices` (all episodes if None). std is the population
    std; a constant feature has std 0 and the normalizer must guard it.

    Reads in blocks and merges per-block moments (Chan et al.), so memory stays bounded and the
    mean/variance of large values do not lose precision.
    """
    if episode_indices is None:
        episode_indices = np.arange(store.n_episodes)
    runs = _runs(store, episode_indices)
    if not runs:
        raise ValueError(f"{store.path}: no episodes to compute statistics on")
    stats = {}
    for key in keys:
        arr = store.array(key)
        count, mean, m2 = 0, 0.0, 0.0
        lo, hi = None, None
        for start, end in runs:
            for a in range(start, end, max_read_steps):
                block = np.asarray(arr[a:min(a + max_read_steps, end)], dtype=np.float64)
                n = len(block)
                bmean = block.mean(axis=0)
                bm2 = ((block - bmean) ** 2).sum(axis=0)
                delta = bmean - mean
                total = count + n
                mean = mean + delta * (n / total)
                m2 = m2 + bm2 + delta**2 * (count * n / total)
                count = total
                bmin, bmax = block.min(axis=0), block.max(axis=0)
                lo = bmin if lo is None else np.minimum(lo, bmin)
                hi = bmax if hi is None else np.maximum(hi, bmax)
        stats[key] = {"min": lo.astype(np.float32), "max": hi.astype(np.float32),
                      "mean": np.asarray(mean, dtype=np.float32), "std": np.sqrt(m2 / count).astype(np.float32)}
    return stats
