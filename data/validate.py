"""Checks on an episode store and on an episode before it is appended.

Every error names the store, the key and the episode, so a user can find the bad demonstration.
"""

from __future__ import annotations

import numpy as np


class EpisodeStoreError(ValueError):
    """A store or an episode that breaks the episode-store layout."""


# bool, signed and unsigned integers, floats: what a policy can consume
NUMERIC_KINDS = "biuf"


def _episode_of_step(ends: np.ndarray, step: int) -> int:
    return int(np.searchsorted(ends, step, side="right"))


def _check_dtype(path, key: str, dtype: np.dtype, where: str) -> None:
    if dtype.kind not in NUMERIC_KINDS:
        raise EpisodeStoreError(f"{path}: data/{key}{where} has dtype {dtype}; expected a bool, integer or float dtype")
    if key == "action" and dtype.kind != "f":
        raise EpisodeStoreError(f"{path}: data/{key}{where} has dtype {dtype}; actions must be floating point")
    if key.endswith("_image") and dtype != np.uint8:
        raise EpisodeStoreError(f"{path}: data/{key}{where} has dtype {dtype}; images must be uint8 (T, H, W, C)")


def _first_nonfinite(values: np.ndarray) -> int | None:
    """Index along axis 0 of the first step holding NaN or inf, or None."""
    if values.dtype.kind != "f":
        return None
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def check_episode(episode: dict[str, np.ndarray], existing: dict | None, path, index: int) -> None:
    """Raise EpisodeStoreError if `episode` cannot be appended as episode `index`.

    `existing` maps the store's keys to their arrays (None for an empty store, whose first episode
    sets the keys, shapes and dtypes).
    """
    where = f" of episode {index}"
    if not episode:
        raise EpisodeStoreError(f"{path}: episode {index} has no keys")
    if existing is not None:
        missing = sorted(set(existing) - set(episode))
        extra = sorted(set(episode) - set(existing))
        if missing:
            raise EpisodeStoreError(f"{path}: episode {index} is missing key(s) {missing} that the store has")
        if extra:
            raise EpisodeStoreError(f"{path}: episode {index} has key(s) {extra} that the store does not have "
                                    f"(store keys: {sorted(existing)})")
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in episode.items()}
    if None in lengths.values():
        key = next(k for k, n in lengths.items() if n is None)
        raise EpisodeStoreError(f"{path}: data/{key}{where} is a scalar; expected an array of shape (T, ...)")
    if len(set(lengths.values())) > 1:
        raise EpisodeStoreError(f"{path}: arrays{where} have different lengths: {lengths}")
    if next(iter(lengths.values())) == 0:
        raise EpisodeStoreError(f"{path}: episode {index} has no steps")
    for key, value in episode.items():
        _check_dtype(path, key, value.dtype, where)
        if existing is not None:
            arr = existing[key]
            if value.shape[1:] != tuple(arr.shape[1:]):
                raise EpisodeStoreError(f"{path}: data/{key}{where} has per-step shape {value.shape[1:]}; "
                                        f"the store has {tuple(arr.shape[1:])}")
            if not np.can_cast(value.dtype, arr.dtype, casting="same_kind"):
                raise EpisodeStoreError(f"{path}: data/{key}{where} has dtype {value.dtype}; "
                                        f"the store has {arr.dtype}")
        step = _first_nonfinite(value)
        if step is not None:
            raise EpisodeStoreError(f"{path}: data/{key}{where} has NaN or inf at step {step}")


def check_store(arrays: dict, ends: np.ndarray, attrs: dict, path, full: bool = False) -> None:
    """Raise EpisodeStoreError on the first problem in an opened store: its data arrays
    ({key: zarr array}), meta/episode_ends and attrs.

    Cheap checks read only metadata and episode_ends; full=True also scans float data for NaN/inf.
    """
    if ends.ndim != 1 or ends.dtype.kind not in "iu":
        raise EpisodeStoreError(f"{path}: meta/episode_ends has dtype {ends.dtype} and shape {ends.shape}; "
                                "expected a 1-D integer array")
    if len(ends):
        if ends[0] <= 0:
            raise EpisodeStoreError(f"{path}: meta/episode_ends is out of range at episode 0: ends at {ends[0]} "
                                    "(must be > 0)")
        steps = np.diff(ends)
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0)) + 1
            raise EpisodeStoreError(f"{path}: meta/episode_ends is not increasing at episode {i}: "
                                    f"ends at {ends[i]} after episode {i - 1} ended at {ends[i - 1]}")
    n_steps = int(ends[-1]) if len(ends) else 0
    keys = sorted(arrays)
    required = list(attrs.get("obs_keys") or []) + ([attrs["action_key"]] if attrs.get("action_key") else [])
    for key in required:
        if key not in keys and len(ends):
            raise EpisodeStoreError(f"{path}: missing key data/{key} (named in the store's attrs; "
                                    f"keys present: {keys})")
    for key in keys:
        arr = arrays[key]
        _check_dtype(path, key, np.dtype(arr.dtype), "")
        if arr.shape[0] < n_steps:
            i = _episode_of_step(ends, arr.shape[0])
            raise EpisodeStoreError(
                f"{path}: arrays of different lengths: data/{key} has {arr.shape[0]} steps but "
                f"meta/episode_ends says {n_steps}; episode {i} (ends at step {ends[i]}) is out of range for it")
    if full:
        _scan_nonfinite(arrays, ends, path, keys)


def _scan_nonfinite(arrays: dict, ends: np.ndarray, path, keys) -> None:
    from tqdm import tqdm

    n_steps = int(ends[-1]) if len(ends) else 0
    for key in tqdm(keys, desc="scanning for NaN/inf", disable=n_steps < 1_000_000, leave=False):
        arr = arrays[key]
        if np.dtype(arr.dtype).kind != "f":
            continue
        step_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        block = arr.chunks[0] * max(1, (64 << 20) // max(step_bytes * arr.chunks[0], 1))  # ~64 MB reads
        for start in range(0, n_steps, block):
            step = _first_nonfinite(np.asarray(arr[start:min(start + block, n_steps)]))
            if step is not None:
                step += start
                i = _episode_of_step(ends, step)
                first = int(ends[i - 1]) if i else 0
                raise EpisodeStoreError(f"{path}: data/{key} has NaN or inf in episode {i} "
                                        f"at step {step - first} (global step {step})")


def check_finite(store, keys=None) -> None:
    """Raise EpisodeStoreError, one line naming the store, key, episode and step, at the first NaN or
    inf in the float data of `store` (an EpisodeStore or a store path), over the given keys (default:
    all). Reads every value: call it once, before training, where a NaN would otherwise train silently."""
    if not hasattr(store, "episode_ends"):
        from dopr.data.episode_store import EpisodeStore

        store = EpisodeStore.open(store, mode="r")
    keys = store.keys if keys is None else list(keys)
    missing = sorted(set(keys) - set(store.keys))
    if missing:
        raise EpisodeStoreError(f"{store.path}: no key(s) {missing} (keys present: {store.keys})")
    _scan_nonfinite({k: store.array(k) for k in keys}, store.episode_ends, store.path, keys)
