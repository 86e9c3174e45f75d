"""Fixed-length windows over the episodes of a store, padded at episode edges.

diffusion_policy's semantics: an episode of length L gives the windows that start at offsets
-pad_before .. L - sequence_length + pad_after; steps of a window that fall before the episode's
first step repeat the first step, and steps after its last step repeat the last step. A window
never crosses into another episode.
"""

from __future__ import annotations

import numpy as np


def is_image_like(arr) -> bool:
    """Per-step arrays of rank >= 3: (H, W, C) frames."""
    return len(arr.shape) >= 4


# Reading a frame from zarr costs ~0.3-1 ms of per-chunk overhead (python -m dopr.data.bench
# --image-size 84), far more than a gather from memory; like diffusion_policy, which copies the
# whole replay buffer into memory, images are cached unless they would take more than this.
IMAGE_CACHE_BYTES = 4 << 30


class SequenceSampler:
    """Windows of `sequence_length` steps of `keys` over `episode_indices` (all episodes if None).

    Low-dim arrays are copied into memory once (reading zarr per item would dominate a training
    step). Image arrays too when cache_images is True, or None and they fit in IMAGE_CACHE_BYTES;
    otherwise their frames are read from the store per sample.
    `key_first_k` = {key: k} reads only the first k steps of a window for that key (observations
    need To steps of a Tp-step window), and returns arrays of length k for it.
    """

    def __init__(self, store, keys, sequence_length: int, pad_before: int = 0, pad_after: int = 0,
                 episode_indices=None, key_first_k: dict[str, int] | None = None, cache_images: bool | None = None):
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        if not 0 <= pad_before < sequence_length or not 0 <= pad_after < sequence_length:
            raise ValueError(f"pad_before ({pad_before}) and pad_after ({pad_after}) must be in [0, sequence_length)")
        self.keys = list(keys)
        self.sequence_length = sequence_length
        self.key_first_k = {k: min(v, sequence_length) for k, v in (key_first_k or {}).items()}
        if episode_indices is None:
            episode_indices = np.arange(store.n_episodes)
        self.episode_indices = np.asarray(episode_indices, dtype=np.int64)

        window_start, first, last = [], [], []
        for i in self.episode_indices:
            start, end = store.episode_range(int(i))
            offsets = np.arange(-pad_before, end - start - sequence_length + pad_after + 1)
            window_start.append(start + offsets)
            first.append(np.full(len(offsets), start))
            last.append(np.full(len(offsets), end - 1))
        cat = lambda parts: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
        self._window_start, self._first, self._last = cat(window_start), cat(first), cat(last)

        n = store.n_steps
        arrays = {key: store.array(key) for key in self.keys}
        if cache_images is None:
            image_bytes = sum(n * np.prod(a.shape[1:]) * a.dtype.itemsize for a in arrays.values() if is_image_like(a))
            cache_images = image_bytes <= IMAGE_CACHE_BYTES
        self._arrays = {key: arr if is_image_like(arr) and not cache_images else np.asarray(arr[:n])
                        for key, arr in arrays.items()}

    def __len__(self) -> int:
        return len(self._window_start)

    def time_indices(self, indices) -> np.ndarray:
        """(B, sequence_length) global step indices of windows `indices`, clipped to each episode:
        clipping is exactly the repeat-first/last-step padding."""
        indices = np.asarray(indices, dtype=np.int64)
        t = self._window_start[indices, None] + np.arange(self.sequence_length)
        return np.clip(t, self._first[indices, None], self._last[indices, None])

    def sample_batch(self, indices) -> dict[str, np.ndarray]:
        """{key: (B, sequence_length or k, ...)} for windows `indices`, one vectorized gather per key."""
        t = self.time_indices(indices)
        out = {}
        for key, arr in self._arrays.items():
            tk = t[:, : self.key_first_k.get(key, self.sequence_length)]
            if isinstance(arr, np.ndarray):
                out[key] = arr[tk]
            else:  # on disk: read each distinct frame once
                frames, inverse = np.unique(tk, return_inverse=True)
                out[key] = np.asarray(arr.get_orthogonal_selection((frames,)))[inverse.reshape(tk.shape)]
        return out

    def sample_sequence(self, i: int) -> dict[str, np.ndarray]:
        """{key: (sequence_length or k, ...)} for window i."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        return {k: v[0] for k, v in self.sample_batch([i % len(self)]).items()}
