"""EpisodeStore: demonstrations in a zarr group, one episode appended at a time.

Layout (diffusion_policy's ReplayBuffer, so its datasets open here unchanged, zarr v2 or v3):

    <store>.zarr/
        data/<key>          arrays concatenated over time (axis 0), e.g. data/action (N, A)
        meta/episode_ends   int64, cumulative: episode i is steps [ends[i-1], ends[i])

Appending is atomic. The data arrays are grown and written first; the episode is committed by
growing meta/episode_ends by one element, whose new value is written into the chunk *before* the
array's shape is updated, so that the commit is a single metadata-file write (zarr writes every
file to a temporary name and renames it, since zarr-python PR #3412 of Aug 2025; 3.1.5 is
installed and tested here). A writer killed at any moment therefore leaves a store whose
episode_ends names only complete episodes; steps written past episode_ends[-1] are ignored by
readers and cut off when the store is next opened for appending. One writer at a time: appends
from two processes into one store are not coordinated.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync as _sync

from dopr.data.validate import EpisodeStoreError, check_episode, check_store

# Chunk sizes follow how the sampler reads. Low-dim arrays are copied into memory once, so their
# chunk size only sets the cost of an append (the last, partial chunk is read, extended and
# rewritten) and the number of files: a few hundred steps keeps both small. Images are read
# either whole (into the sampler's memory cache) or a few frames at random positions. zarr spends
# about a millisecond per chunk whatever its size (3000 84x84x3 frames on one core: one frame per
# chunk wrote 2.7 ms and read 0.70 ms per frame; 16 per chunk 0.40 and 0.08 ms), while a random
# read decompresses one chunk per frame it needs, so image chunks hold a few frames, up to ~0.5 MB.
LOWDIM_CHUNK_STEPS = 256
MAX_CHUNK_BYTES = 4 << 20
IMAGE_CHUNK_FRAMES = 16
IMAGE_CHUNK_BYTES = 512 << 10
EPISODE_ENDS_CHUNK = 4096


def chunks_for(step_shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """Chunk shape for an array whose per-step shape is `step_shape` (see the comment above)."""
    step_bytes = max(int(np.prod(step_shape, dtype=np.int64)) * np.dtype(dtype).itemsize, 1)
    if len(step_shape) >= 3:  # (H, W, C) frames
        steps = int(np.clip(IMAGE_CHUNK_BYTES // step_bytes, 1, IMAGE_CHUNK_FRAMES))
    else:
        steps = int(np.clip(MAX_CHUNK_BYTES // step_bytes, 1, LOWDIM_CHUNK_STEPS))
    return (steps, *step_shape)


def _compressors(zarr_format: int):
    # Blosc with zstd and byte shuffle: floats compress well after shuffling and decompress fast.
    if zarr_format == 2:
        import numcodecs

        return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def _with_steps(arr: zarr.AsyncArray, n: int) -> zarr.AsyncArray:
    """`arr` with a shape of `n` steps in memory only: what is written through it lands in chunks
    that readers, who go by the shape on disk, do not see until the array is resized."""
    return zarr.AsyncArray(arr.metadata.update_shape((n, *arr.shape[1:])), arr.store_path, arr._config)


async def _write_uncommitted(arrays, start: int, ends: zarr.AsyncArray, new_ends: np.ndarray) -> None:
    """All of an append but its commit, at once on zarr's event loop (one synchronous round trip
    per zarr call would dominate an append): steps [start, end) and the new shape of every data
    array, and episode_ends' new elements, hidden in their chunk behind the old shape."""
    n, end = ends.shape[0], int(new_ends[-1])
    await asyncio.gather(
        # order does not matter here: steps past episode_ends[-1] are ignored by readers
        *(arr.resize((end, *arr.shape[1:]), delete_outside_chunks=False) for arr, _ in arrays),  # growing
        *(_with_steps(arr, end).setitem(slice(start, end), value.astype(arr.dtype, copy=False))
          for arr, value in arrays),
        _with_steps(ends, n + len(new_ends)).setitem(slice(n, n + len(new_ends)), new_ends),
    )


class EpisodeStore:
    """A zarr episode store. Build with `create` or `open`, never directly."""

    def __init__(self, group: zarr.Group, path: Path, mode: str):
        self._group = group
        self.path = path
        self.mode = mode
        self._ends = self._read_episode_ends()
        # opened once: opening a zarr array reads its metadata file, which would dominate appends
        self._arrays = {k: group["data"][k] for k in group["data"].array_keys()}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, path, attrs: Mapping | None = None, overwrite: bool = False) -> EpisodeStore:
        """Create an empty store at `path` (zarr v3). Built in a temporary folder and renamed
        into place, so a store either exists complete or not at all."""
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.create_group("data")
        group.create_group("meta").create_array(
            "episode_ends", shape=(0,), dtype="int64", chunks=(EPISODE_ENDS_CHUNK,), fill_value=0
        )
        if attrs:
            group.attrs.update(dict(attrs))
        os.rename(tmp, path)
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path, mode: str = "r") -> EpisodeStore:
        """Open a store (a .zarr folder, or a .zarr.zip file read-only): mode "r" (read only) or
        "a" (append; creates the store if missing).

        Runs the cheap validation (layout, episode_ends, lengths, dtypes); `validate(full=True)`
        also scans for NaN/inf. In mode "a", steps left behind by an interrupted append are cut off.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        if not path.exists():
            if mode == "a":
                return cls.create(path)
            raise FileNotFoundError(f"{path}: no episode store there")
        try:
            if path.is_file():  # a zipped store (diffusion_policy caches image datasets as .zarr.zip)
                if mode != "r":
                    raise PermissionError(f"{path}: zipped stores open read-only; unzip it to append")
                group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
            else:
                group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except PermissionError:
            raise
        except Exception as err:  # zarr raises several types for "not a group"
            raise EpisodeStoreError(f"{path}: not a zarr group ({type(err).__name__}: {err})") from err
        store = cls(group, path, mode)
        store.validate(full=False)
        if mode == "a":
            store._discard_uncommitted()
        return store

    # ---- reading ------------------------------------------------------------------------
    def _read_episode_ends(self) -> np.ndarray:
        if "meta" not in self._group or "episode_ends" not in self._group["meta"]:
            raise EpisodeStoreError(f"{self.path}: missing meta/episode_ends (not an episode store)")
        if "data" not in self._group:
            raise EpisodeStoreError(f"{self.path}: missing the data/ group (not an episode store)")
        self._ends_array = self._group["meta/episode_ends"]
        return np.asarray(self._ends_array[:])

    @property
    def zarr_format(self) -> int:
        return self._group.metadata.zarr_format

    @property
    def episode_ends(self) -> np.ndarray:
        return self._ends.astype(np.int64)

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    @property
    def keys(self) -> list[str]:
        return sorted(self._arrays)

    @property
    def attrs(self):
        """The store's attributes: a mutable mapping, each assignment persisted (mode "a")."""
        return self._group.attrs

    def array(self, key: str) -> zarr.Array:
        """The zarr array data/<key>. It may hold steps past n_steps (an interrupted append): slice [:n_steps]."""
        if key not in self._arrays:
            raise KeyError(f"{self.path}: no key data/{key} (keys: {', '.join(self.keys)})")
        return self._arrays[key]

    def episode_range(self, i: int) -> tuple[int, int]:
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"{self.path}: episode {i} out of range (store has {n} episodes)")
        i %= n
        return (int(self._ends[i - 1]) if i > 0 else 0), int(self._ends[i])

    def get_episode(self, i: int, keys=None) -> dict[str, np.ndarray]:
        start, end = self.episode_range(i)
        return {k: np.asarray(self.array(k)[start:end]) for k in (keys or self.keys)}

    def validate(self, full: bool = False) -> None:
        """Raise EpisodeStoreError naming the key and episode of the first problem found.
        full=True also reads every float array to look for NaN/inf."""
        check_store(self._arrays, self._ends, dict(self.attrs), self.path, full=full)

    def __len__(self) -> int:
        return self.n_episodes

    def __repr__(self) -> str:
        return f"EpisodeStore({str(self.path)!r}, episodes={self.n_episodes}, steps={self.n_steps}, keys={self.keys})"

    # ---- writing ------------------------------------------------------------------------
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise PermissionError(f"{self.path}: opened read-only; open with mode='a' to append")

    def _discard_uncommitted(self) -> None:
        """Cut arrays back to episode_ends[-1] and remove temporary files of an interrupted write."""
        n = self.n_steps
        for key in self.keys:
            arr = self.array(key)
            if arr.shape[0] > n:
                arr.resize((n, *arr.shape[1:]))
        for partial in self.path.rglob("*.partial"):  # zarr's temporary files, never renamed
            partial.unlink(missing_ok=True)

    def append_episode(self, episode: Mapping[str, np.ndarray]) -> int:
        """Append one episode ({key: (T, ...) array}, the same keys as the store) atomically.
        Returns its index."""
        return self.append_episodes([episode])[0]

    def append_episodes(self, episodes: Sequence[Mapping[str, np.ndarray]]) -> list[int]:
        """Append several episodes in one atomic commit: a reader sees all of them or none.
        Cheaper per episode than one append each (one resize and one chunk write per array for the
        whole batch), which matters to a writer that receives many short episodes. Returns their indices."""
        self._require_writable()
        first = self.n_episodes
        episodes = [{k: np.asarray(v) for k, v in ep.items()} for ep in episodes]
        if not episodes:
            return []
        check_episode(episodes[0], self._arrays if first > 0 else None, self.path, first)
        if first == 0:  # the key set is not committed yet: (re)create every array from the first episode
            data = self._group["data"]
            for key in self.keys:
                del data[key]
            fmt = self.zarr_format
            self._arrays = {}
            for key, value in episodes[0].items():
                self._arrays[key] = data.create_array(
                    key, shape=(0, *value.shape[1:]), dtype=value.dtype,
                    chunks=chunks_for(value.shape[1:], value.dtype),
                    compressors=_compressors(fmt), fill_value=0,
                )
        for i, ep in enumerate(episodes[1:], start=first + 1):
            check_episode(ep, self._arrays, self.path, i)
        start = self.n_steps
        ends = start + np.cumsum([len(next(iter(ep.values()))) for ep in episodes], dtype=np.int64)
        arrays = [(self._arrays[k]._async_array, np.concatenate([ep[k] for ep in episodes]) if len(episodes) > 1
                   else episodes[0][k]) for k in self._arrays]
        _sync(_write_uncommitted(arrays, start, self._ends_array._async_array, ends))
        # the commit: one atomic metadata write makes the new elements, and so the episodes, visible
        self._ends_array.resize((first + len(episodes),))
        self._ends = np.concatenate([self._ends, ends])
        return list(range(first, first + len(episodes)))
