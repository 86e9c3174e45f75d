"""Export an EpisodeStore as a LeRobotDataset v3.0 folder (`dopr data export-lerobot`).

What lerobot 0.4.4's ``LeRobotDataset(repo_id, root=ROOT)`` loads: meta/info.json, meta/stats.json,
meta/tasks.parquet, meta/episodes/..., data/chunk-*/file-*.parquet with several episodes per file
and, for every camera key, videos/observation.images.<key>/chunk-*/file-*.mp4 with several episodes
per file (AV1 by default, as lerobot writes; H.264 or HEVC on request). Store keys become LeRobot
feature names: the action key -> ``action``; a camera key k (uint8 (H, W, 3) per step) ->
``observation.images.k``; another observation key k -> ``observation.k``; ``reward``/``done`` ->
``next.reward``/``next.done``; any other key keeps its name. meta/dopr.json records the store's key
names and attrs, so importing the export gives the store back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from dopr.data.episode_store import EpisodeStore
from dopr.data.lerobot_format import (
    CODEBASE_VERSION,
    DATA_PATH,
    DOPR_META_PATH,
    EPISODES_PATH,
    INDEX_FEATURES,
    INFO_PATH,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    aggregate_stats,
    feature_stats,
    require,
)
from dopr.data.lerobot_video import VideoWriter, video_info
from dopr.data.validate import EpisodeStoreError

CHUNKS_SIZE = 1000  # files per chunk folder (lerobot's DEFAULT_CHUNK_SIZE)
DATA_FILE_MB = 100  # lerobot starts a new parquet file past this size, and a new mp4 past VIDEO_FILE_MB
VIDEO_FILE_MB = 200
RENAMES = {"reward": "next.reward", "done": "next.done"}


def is_camera(step_shape: tuple, dtype: np.dtype) -> bool:
    return len(step_shape) == 3 and step_shape[-1] == 3 and dtype == np.uint8


def lerobot_names(store: EpisodeStore) -> dict[str, str]:
    """{store key: LeRobot feature name} (see the module docstring); raises for keys it cannot export."""
    attrs = dict(store.attrs)
    action_key = attrs.get("action_key", "action")
    if action_key not in store.keys:
        raise EpisodeStoreError(f"{store.path}: no action key '{action_key}' (keys {store.keys})")
    obs_keys = set(attrs.get("obs_keys", []))
    names = {}
    for key in store.keys:
        arr = store.array(key)
        step_shape, dtype = tuple(arr.shape[1:]), np.dtype(arr.dtype)
        if key == "task_index":
            continue  # becomes the task_index column
        if is_camera(step_shape, dtype):
            name = key if key.startswith("observation.images.") else f"observation.images.{key}"
        elif len(step_shape) > 1:
            raise EpisodeStoreError(f"{store.path}: data/{key} has per-step shape {step_shape}; LeRobot export takes "
                                    "vectors, scalars and uint8 (H, W, 3) camera frames")
        elif key == action_key:
            name = "action"
        elif key in obs_keys:
            name = key if key.startswith("observation.") else f"observation.{key}"
        else:
            name = RENAMES.get(key, key)
        if "/" in name or name in INDEX_FEATURES:
            raise EpisodeStoreError(f"{store.path}: key '{key}' cannot be a LeRobot feature name ('{name}')")
        names[key] = name
    clash = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    if clash:
        raise EpisodeStoreError(f"{store.path}: several keys map to the LeRobot feature(s) {clash}")
    return names


class _FileSeries:
    """chunk-XXX/file-YYY indices of one kind of file; ``advance`` moves to the next file."""

    def __init__(self):
        self.chunk, self.file = 0, 0

    def advance(self) -> None:
        self.chunk, self.file = (self.chunk + 1, 0) if self.file == CHUNKS_SIZE - 1 else (self.chunk, self.file + 1)


def _arrow_column(values: np.ndarray):
    """(T,) -> a scalar column; (T, D) -> fixed-size lists of D named as lerobot's datasets writes them."""
    pa = require("pyarrow")
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, type=pa.list_(pa.field("element", flat.type), values.shape[1]))


def _tolist(stats: dict[str, np.ndarray]) -> dict:
    return {k: np.asarray(v).tolist() for k, v in stats.items()}


def _tasks_table(tasks: list[str]):
    """meta/tasks.parquet as lerobot writes it: a pandas frame indexed by the task string."""
    pa = require("pyarrow")
    def column(name, field, pandas_type, numpy_type, metadata=None):
        return {"name": name, "field_name": field, "pandas_type": pandas_type, "numpy_type": numpy_type,
                "metadata": metadata}

    pandas_meta = {"index_columns": ["__index_level_0__"],
                   "column_indexes": [column(None, None, "unicode", "str", {"encoding": "UTF-8"})],
                   "columns": [column("task_index", "task_index", "int64", "int64"),
                               column(None, "__index_level_0__", "object", "str")],
                   "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__},
                   "pandas_version": "3.1.1"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(tasks, pa.large_string())})
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


class _Exporter:
    """Writes the episodes one by one into the current data and video files, collecting the metadata."""

    def __init__(self, store: EpisodeStore, root: Path, names: dict[str, str], fps: int, vcodec: str,
                 data_file_mb: float, video_file_mb: float):
        self.store, self.root, self.names, self.fps, self.vcodec = store, root, names, fps, vcodec
        self.data_bytes, self.video_bytes = data_file_mb * 2**20, video_file_mb * 2**20
        self.cameras = [k for k in names if is_camera(tuple(store.array(k).shape[1:]), np.dtype(store.array(k).dtype))]
        self.data_files, self.data_writer, self.data_size = _FileSeries(), None, 0
        self.video_files = {k: _FileSeries() for k in self.cameras}
        self.video_writers: dict[str, VideoWriter] = {}
        self.episode_rows: list[tuple[dict, dict, list[int]]] = []  # (metadata row, stats, task indices)
        self.frames = 0

    def _data_writer(self, table):
        pq = require("pyarrow.parquet")
        if self.data_writer is not None and self.data_size >= self.data_bytes:
            self.data_writer.close()
            self.data_writer = None
            self.data_files.advance()
        if self.data_writer is None:
            path = self.root / DATA_PATH.format(chunk_index=self.data_files.chunk, file_index=self.data_files.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.data_writer, self.data_size = pq.ParquetWriter(path, table.schema), 0
        return self.data_writer

    def _video_writer(self, key: str) -> VideoWriter:
        writer, files = self.video_writers.get(key), self.video_files[key]
        if writer is not None and writer.bytes_written >= self.video_bytes:
            writer.close()
            writer = None
            files.advance()
        if writer is None:
            path = self.root / VIDEO_PATH.format(video_key=self.names[key], chunk_index=files.chunk,
                                                 file_index=files.file)
            writer = self.video_writers[key] = VideoWriter(path, self.fps, self.vcodec)
        return writer

    def add(self, index: int, episode: dict[str, np.ndarray], task_index: np.ndarray) -> None:
        pa = require("pyarrow")
        n = len(episode[next(iter(episode))])
        frame_index = np.arange(n, dtype=np.int64)
        columns = {self.names[k]: v for k, v in episode.items() if k not in self.cameras}
        columns.update(timestamp=(frame_index / self.fps).astype(np.float32), frame_index=frame_index,
                       episode_index=np.full(n, index, np.int64), index=self.frames + frame_index,
                       task_index=task_index.astype(np.int64))
        table = pa.table({name: _arrow_column(values) for name, values in columns.items()})
        self._data_writer(table).write_table(table)
        self.data_size += table.nbytes
        row = {"episode_index": index, "length": n, "data/chunk_index": self.data_files.chunk,
               "data/file_index": self.data_files.file, "dataset_from_index": self.frames,
               "dataset_to_index": self.frames + n}
        stats = {name: feature_stats(values, camera=False) for name, values in columns.items()}
        for key in self.cameras:
            writer = self._video_writer(key)
            start = writer.duration
            writer.write(episode[key])
            name = self.names[key]
            row.update({f"videos/{name}/chunk_index": self.video_files[key].chunk,
                        f"videos/{name}/file_index": self.video_files[key].file,
                        f"videos/{name}/from_timestamp": start, f"videos/{name}/to_timestamp": writer.duration})
            stats[name] = feature_stats(episode[key], camera=True)
        self.episode_rows.append((row, stats, sorted(set(task_index.tolist()))))
        self.frames += n

    def close(self) -> None:
        if self.data_writer is not None:
            self.data_writer.close()
        for writer in self.video_writers.values():
            writer.close()
        self.data_writer, self.video_writers = None, {}


def export_lerobot(store_path, root, fps: int | None = None, vcodec: str = "libsvtav1", task: str | None = None,
                   overwrite: bool = False, progress: bool = True, data_file_mb: float = DATA_FILE_MB,
                   video_file_mb: float = VIDEO_FILE_MB) -> Path:
    """Write the store at ``store_path`` as a LeRobotDataset v3.0 folder ``root``; return ``root``.

    ``fps`` defaults to the store's attrs['control_freq']; ``task`` (the language instruction of every
    episode, unless the store has a task_index key) to attrs['task']. Built in a temporary folder and
    renamed into place.
    """
    from tqdm import tqdm

    pq = require("pyarrow.parquet")
    pa = require("pyarrow")
    store, root = EpisodeStore.open(store_path, mode="r"), Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root}: already exists (pass overwrite=True to replace it)")
    if store.n_episodes == 0:
        raise EpisodeStoreError(f"{store.path}: no episodes to export")
    attrs = dict(store.attrs)
    fps = fps or attrs.get("control_freq")
    if not fps or float(fps) != int(fps):
        raise ValueError(f"{store.path}: attrs has no integer 'control_freq' ({fps!r}); pass the frame rate (--fps)")
    fps = int(fps)
    names = lerobot_names(store)
    tasks = list(attrs.get("lerobot", {}).get("tasks") or [task or attrs.get("task") or ""])
    tmp = root.with_name(f".{root.name}.exporting-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    exporter = _Exporter(store, tmp, names, fps, vcodec, data_file_mb, video_file_mb)
    try:
        for i in tqdm(range(store.n_episodes), desc=f"export {store.path.name}", disable=not progress, unit="episode"):
            episode = store.get_episode(i, keys=list(names) + (["task_index"] if "task_index" in store.keys else []))
            task_index = episode.pop("task_index", np.zeros(len(episode[next(iter(episode))]), np.int64))
            if task_index.min() < 0 or task_index.max() >= len(tasks):
                raise EpisodeStoreError(f"{store.path}: data/task_index of episode {i} holds {task_index.max()}, but "
                                        f"attrs['lerobot']['tasks'] names {len(tasks)} task(s)")
            exporter.add(i, episode, task_index)
        exporter.close()
        _write_meta(tmp, store, exporter, fps, tasks, attrs, data_file_mb, video_file_mb)
        pq.write_table(_tasks_table(tasks), _mkparent(tmp / TASKS_PATH))
        rows = [{**row, "tasks": [tasks[i] for i in task_indices], "meta/episodes/chunk_index": 0,
                 "meta/episodes/file_index": 0,
                 **{f"stats/{name}/{s}": v.tolist() for name, st in stats.items() for s, v in st.items()}}
                for row, stats, task_indices in exporter.episode_rows]
        pq.write_table(pa.Table.from_pylist(rows), _mkparent(tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)))
    except BaseException:
        exporter.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    return root


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_meta(root: Path, store: EpisodeStore, exporter: _Exporter, fps: int, tasks: list[str], attrs: dict,
                data_file_mb: float, video_file_mb: float) -> None:
    features = {k: dict(v) for k, v in INDEX_FEATURES.items()}
    for key, name in exporter.names.items():
        arr = store.array(key)
        if key in exporter.cameras:
            path = root / VIDEO_PATH.format(video_key=name, chunk_index=0, file_index=0)
            features[name] = {"dtype": "video", "shape": list(arr.shape[1:]), "names": ["height", "width", "channels"],
                              "info": video_info(path)}
        else:
            features[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape[1:]) or [1], "names": None}
    n = store.n_episodes
    info = {"codebase_version": CODEBASE_VERSION, "robot_type": attrs.get("robot_type"), "total_episodes": n,
            "total_frames": exporter.frames, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": data_file_mb, "video_files_size_in_mb": video_file_mb, "fps": fps,
            "splits": {"train": f"0:{n}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if exporter.cameras else None,
            "features": features}
    _mkparent(root / INFO_PATH).write_text(json.dumps(info, indent=4))
    per_feature = {}
    for _, stats, _ in exporter.episode_rows:
        for name, s in stats.items():
            per_feature.setdefault(name, []).append(s)
    (root / STATS_PATH).write_text(json.dumps({k: _tolist(aggregate_stats(v)) for k, v in per_feature.items()},
                                              indent=4))
    dopr_meta = {"keys": {name: key for key, name in exporter.names.items()}, "attrs": attrs, "store": str(store.path)}
    (root / DOPR_META_PATH).write_text(json.dumps(dopr_meta, indent=1, default=str))
