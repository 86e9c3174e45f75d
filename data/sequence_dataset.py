"""SequenceDataset: the torch Dataset that training reads (obs windows and action chunks).

Window convention (diffusion_policy): a window of Tp = horizon steps starts at t - (To - 1) for
the current step t; the observations are its first To steps and the actions all Tp steps, so at
inference the executed actions are action[To-1 : To-1+Ta].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dopr.data.episode_store import EpisodeStore
from dopr.data.sequence_sampler import SequenceSampler, is_image_like
from dopr.data.split import resolve_split
from dopr.data.stats import compute_stats


class SequenceDataset(torch.utils.data.Dataset):
    """{"obs": {key: (To, ...)}, "action": (Tp, A)}: float32, images uint8 (To, H, W, C).

    Every step t of an episode is a current step when n_action_steps is None (pad_before =
    To - 1, pad_after = Tp - To); with n_action_steps = Ta, pad_after = Ta - 1 as in
    diffusion_policy. The split comes from `resolve_split(store, val_ratio, seed)`.

    `dataset[i]` gives one window; `dataset[array_of_indices]` gives a whole batch in one
    vectorized gather (leading dim B); training (dopr.train) asks for whole batches this way: per-item
    loading with default collation is ~40x slower (python -m dopr.data.bench).
    """

    def __init__(self, store, obs_keys, n_obs_steps: int = 2, horizon: int = 16, split: str = "train",
                 action_key: str = "action", n_action_steps: int | None = None, val_ratio: float = 0.1,
                 seed: int = 0, cache_images: bool | None = None):
        if isinstance(store, (str, Path)):
            store = EpisodeStore.open(store, mode="r")
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"need 1 <= n_obs_steps <= horizon, got To={n_obs_steps}, Tp={horizon}")
        for key in [*obs_keys, action_key]:
            if key not in store.keys:
                raise KeyError(f"{store.path}: no key data/{key} (keys: {', '.join(store.keys)})")
        self.store = store
        self.obs_keys = list(obs_keys)
        self.action_key = action_key
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        self.train_episodes, self.val_episodes = resolve_split(store, val_ratio, seed)
        episodes = {"train": self.train_episodes, "val": self.val_episodes,
                    "all": np.arange(store.n_episodes)}
        if split not in episodes:
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        self.split = split
        self.episode_indices = episodes[split]
        pad_after = (n_action_steps - 1) if n_action_steps is not None else horizon - n_obs_steps
        self.sampler = SequenceSampler(
            store, [*self.obs_keys, action_key], sequence_length=horizon, pad_before=n_obs_steps - 1,
            pad_after=pad_after, episode_indices=self.episode_indices,
            key_first_k={k: n_obs_steps for k in self.obs_keys}, cache_images=cache_images)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, index):
        single = np.ndim(index) == 0
        windows = self.sampler.sample_batch([index] if single else index)
        def convert(x):
            x = torch.from_numpy(np.ascontiguousarray(x))
            x = x if x.dtype == torch.uint8 else x.float()
            return x[0] if single else x
        return {"obs": {k: convert(windows[k]) for k in self.obs_keys},
                "action": convert(windows[self.action_key])}

    @property
    def lowdim_obs_keys(self) -> list[str]:
        return [k for k in self.obs_keys if not is_image_like(self.store.array(k))]

    def normalizer_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """compute_stats of the low-dim observation keys and the action on the TRAIN split (also
        for a validation dataset, so both are normalized the same way)."""
        return compute_stats(self.store, [*self.lowdim_obs_keys, self.action_key], self.train_episodes)
