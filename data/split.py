"""Episode-level train/validation split, seeded and recorded in the store's attrs.

Splitting by episode (not by window) keeps windows of one demonstration out of both sides, so
validation loss measures generalisation to unseen demonstrations.
"""

from __future__ import annotations

import warnings

import numpy as np

from dopr.data.validate import EpisodeStoreError


def split_episodes(n_episodes: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random episode-level split: (train_idx, val_idx), sorted int64 arrays.

    At least one validation episode when val_ratio > 0 and there are two or more episodes, and at
    least one training episode whenever there is one.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    n_val = 0
    if val_ratio > 0 and n_episodes > 1:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    perm = np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def record_split(store, val_ratio: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Compute a seeded split of all of the store's episodes and write it to attrs["split"]."""
    train, val = split_episodes(store.n_episodes, val_ratio, seed)
    store.attrs["split"] = {"source": "seeded", "seed": int(seed), "val_ratio": float(val_ratio),
                            "n_episodes": store.n_episodes, "train": train.tolist(), "val": val.tolist()}
    return train, val


def _check_recorded(store, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    train = np.asarray(rec.get("train", []), dtype=np.int64)
    val = np.asarray(rec.get("val", []), dtype=np.int64)
    both = np.concatenate([train, val])
    if len(both) and (both.min() < 0 or both.max() >= store.n_episodes):
        raise EpisodeStoreError(f"{store.path}: attrs['split'] names episode {int(both.max())} or "
                                f"{int(both.min())}, out of range for {store.n_episodes} episodes")
    if len(np.intersect1d(train, val)):
        raise EpisodeStoreError(f"{store.path}: attrs['split'] puts episode(s) "
                                f"{np.intersect1d(train, val)[:5].tolist()} in both train and val")
    return np.sort(train), np.sort(val)


def resolve_split(store, val_ratio: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The split training should use: (train_idx, val_idx).

    A split that came with the data (attrs["split"] with a source other than "seeded", e.g.
    robomimic's mask/train and mask/valid) always wins. A recorded seeded split is reused when it
    was made with the same val_ratio and seed for the same number of episodes; otherwise a new one
    is computed, and recorded when the store is open for writing.
    """
    rec = dict(store.attrs).get("split")
    if rec and rec.get("source", "seeded") != "seeded":
        return _check_recorded(store, rec)
    if rec and (rec.get("seed"), rec.get("val_ratio"), rec.get("n_episodes")) == (seed, val_ratio, store.n_episodes):
        return _check_recorded(store, rec)
    if store.mode == "a":
        return record_split(store, val_ratio, seed)
    if rec:
        warnings.warn(f"{store.path}: the recorded split (seed {rec.get('seed')}, val_ratio "
                      f"{rec.get('val_ratio')}, {rec.get('n_episodes')} episodes) does not match "
                      f"seed {seed}, val_ratio {val_ratio}, {store.n_episodes} episodes; using a new split",
                      stacklevel=2)
    return split_episodes(store.n_episodes, val_ratio, seed)
