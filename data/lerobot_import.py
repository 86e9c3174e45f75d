"""Import a local LeRobotDataset (v3.0, or v2.1) folder into an EpisodeStore (`dopr data import-lerobot`).

Episode i of the store is the dataset's i-th episode in episode_index order, with exactly the rows
the dataset gives it (frame_index order). Numeric features keep their names and dtypes; camera
features (``dtype`` video or image) become uint8 (T, H, W, 3) arrays, each frame taken from the video
at the episode's ``from_timestamp`` plus the row's ``timestamp``. The bookkeeping columns (index,
frame_index, ...) are not copied; ``task_index`` is, when the dataset has more than one task.
A folder written by `dopr data export-lerobot` carries meta/dopr.json, and imports back under the
store's own key names and attrs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dopr.data.episode_store import EpisodeStore
from dopr.data.lerobot_format import (
    CAMERA_DTYPES,
    DOPR_META_PATH,
    EPISODES_DIR,
    INDEX_FEATURES,
    INFO_PATH,
    NUMERIC_DTYPES,
    TASKS_PATH,
    require,
)
from dopr.data.lerobot_video import TOLERANCE_S, VideoFrames
from dopr.data.validate import EpisodeStoreError

# episodes are appended to the store in batches of about this many bytes: one commit per batch costs
# less than one per episode (20 episodes of 100 84x84 frames: 1.42 s one by one, 0.63 s in batches of 5,
# 1.01 s all at once, on a loaded 2-core machine)
APPEND_BYTES = 8 << 20


@dataclass
class _Episode:
    """Where one episode's rows and frames are: its parquet file and, per video key, (mp4, start time)."""

    index: int
    length: int
    data_path: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)


def _read_json(path: Path):
    if not path.is_file():
        raise EpisodeStoreError(f"{path}: not found; is {path.parent.parent} a LeRobot dataset?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EpisodeStoreError(f"{path}: not valid JSON ({err})") from None


def _read_parquet(path: Path, columns=None):
    pq = require("pyarrow.parquet")
    if not path.is_file():
        raise EpisodeStoreError(f"{path}: not found")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as err:  # pyarrow raises ArrowInvalid, KeyError, OSError for unreadable files and columns
        raise EpisodeStoreError(f"{path}: cannot read{' columns ' + str(columns) if columns else ''}: {err}") from None


def _episodes_v30(root: Path, info: dict, video_keys: list[str]) -> list[_Episode]:
    files = sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not files:
        raise EpisodeStoreError(f"{root / EPISODES_DIR}: no chunk-*/file-*.parquet episode metadata found")
    wanted = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in video_keys:
        wanted += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
    episodes = []
    for path in files:
        pq = require("pyarrow.parquet")
        names = set(pq.read_schema(path).names)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise EpisodeStoreError(f"{path}: episode metadata lacks column(s) {missing}")
        rows = _read_parquet(path, wanted).to_pydict()
        for i in range(len(rows["episode_index"])):
            ep = _Episode(int(rows["episode_index"][i]), int(rows["length"][i]), root / info["data_path"].format(
                chunk_index=rows["data/chunk_index"][i], file_index=rows["data/file_index"][i]))
            for key in video_keys:
                ep.videos[key] = (root / info["video_path"].format(
                    video_key=key, chunk_index=rows[f"videos/{key}/chunk_index"][i],
                    file_index=rows[f"videos/{key}/file_index"][i]), float(rows[f"videos/{key}/from_timestamp"][i]))
            episodes.append(ep)
    return episodes


def _episodes_v21(root: Path, info: dict, video_keys: list[str]) -> list[_Episode]:
    """v2.1: meta/episodes.jsonl; one parquet and one mp4 per episode, videos start at 0."""
    path = root / "meta/episodes.jsonl"
    if not path.is_file():
        raise EpisodeStoreError(f"{path}: not found (a v2.1 dataset lists its episodes there)")
    episodes = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        index, chunk = int(row["episode_index"]), int(row["episode_index"]) // int(info.get("chunks_size", 1000))
        ep = _Episode(index, int(row["length"]),
                      root / info["data_path"].format(episode_chunk=chunk, episode_index=index))
        for key in video_keys:
            ep.videos[key] = (root / info["video_path"].format(episode_chunk=chunk, episode_index=index,
                                                               video_key=key), 0.0)
        episodes.append(ep)
    return episodes


def _tasks(root: Path, version: str) -> dict[int, str]:
    if version.startswith("v2"):
        path = root / "meta/tasks.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        return {int(r["task_index"]): str(r["task"]) for r in rows}
    if not (root / TASKS_PATH).is_file():
        return {}
    table = _read_parquet(root / TASKS_PATH)
    # lerobot writes a pandas frame indexed by the task string: the strings are the index column
    text = [n for n in table.column_names if n != "task_index"]
    if "task_index" not in table.column_names or not text:
        raise EpisodeStoreError(f"{root / TASKS_PATH}: expected a task_index column and a task column")
    return dict(zip(map(int, table.column("task_index").to_pylist()), map(str, table.column(text[0]).to_pylist())))


def _is_list(pa, arrow_type) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _column(table, name: str, feature: dict, path: Path) -> np.ndarray:
    """A parquet column as (rows, *shape): scalar columns give (rows,), list columns (rows, *shape)."""
    pa = require("pyarrow")
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise EpisodeStoreError(f"{path}: column '{name}' holds {column.null_count} null values")
    values = column
    while _is_list(pa, values.type):
        values = values.flatten()
    values = values.to_numpy(zero_copy_only=False).astype(np.dtype(feature["dtype"]), copy=False)
    shape = tuple(int(s) for s in feature["shape"])
    if not _is_list(pa, column.type):
        if shape != (1,):
            raise EpisodeStoreError(f"{path}: column '{name}' holds one value per row, meta/info.json gives "
                                    f"'{name}' the shape {list(shape)}")
        return values
    if values.size != len(column) * int(np.prod(shape)):
        raise EpisodeStoreError(f"{path}: column '{name}' holds {values.size // max(len(column), 1)} values per row, "
                                f"meta/info.json gives '{name}' the shape {list(shape)}")
    return values.reshape(len(column), *shape)


def _png_frames(table, name: str, path: Path) -> np.ndarray:
    """An ``image`` feature: PNG/JPEG bytes in a struct column {bytes, path}."""
    import io

    from PIL import Image

    column = table.column(name).combine_chunks()
    try:
        blobs = column.field("bytes").to_pylist()
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    except Exception as err:  # pyarrow (no bytes field), PIL (not an image)
        raise EpisodeStoreError(f"{path}: image column '{name}' cannot be decoded: {err}") from None


class _DataFiles:
    """The rows of one parquet data file at a time (episodes come in file order), split by episode."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        self.path, self.table, self.episode_index, self.frame_index = None, None, None, None

    def rows(self, path: Path, episode: int):
        if path != self.path:
            pq = require("pyarrow.parquet")
            if not path.is_file():
                raise EpisodeStoreError(f"{path}: data file not found")
            have = set(pq.read_schema(path).names)
            missing = [c for c in self.columns if c not in have]
            if missing:
                raise EpisodeStoreError(f"{path}: data file lacks column(s) {missing} that meta/info.json lists")
            self.table, self.path = _read_parquet(path, self.columns), path
            self.episode_index = self.table.column("episode_index").to_numpy()
            self.frame_index = self.table.column("frame_index").to_numpy()
        rows = np.flatnonzero(self.episode_index == episode)
        return self.table.take(rows[np.argsort(self.frame_index[rows], kind="stable")])


def lerobot_features(root: Path) -> tuple[dict, dict]:
    """(info.json, {name: feature}) of the features the importer copies; raises for an unknown dtype."""
    info = _read_json(root / INFO_PATH)
    version = str(info.get("codebase_version", ""))
    if not version.startswith(("v3", "v2.1")):
        raise EpisodeStoreError(f"{root / INFO_PATH}: codebase_version {version!r}; only v3.0 and v2.1 are read")
    for entry in ("fps", "features", "data_path"):
        if entry not in info:
            raise EpisodeStoreError(f"{root / INFO_PATH}: missing '{entry}'")
    features = {}
    for name, feature in info["features"].items():
        dtype = feature.get("dtype")
        if name in INDEX_FEATURES:
            continue
        if dtype not in NUMERIC_DTYPES | CAMERA_DTYPES:
            raise EpisodeStoreError(f"{root / INFO_PATH}: feature '{name}' has dtype {dtype!r}, which dopr cannot "
                                    f"import (numeric: {sorted(NUMERIC_DTYPES)}; cameras: video, image)")
        features[name] = feature
    if "action" not in features:
        raise EpisodeStoreError(f"{root / INFO_PATH}: no 'action' feature (have {sorted(features)})")
    if any(f["dtype"] == "video" for f in features.values()) and not info.get("video_path"):
        raise EpisodeStoreError(f"{root / INFO_PATH}: video features but no 'video_path'")
    return info, features


class LeRobotReader:
    """A LeRobot dataset folder read episode by episode: iterate for (description, {store key: array});
    ``attrs`` are the attrs of the store it becomes, ``episodes`` where each episode's rows and frames are."""

    def __init__(self, root, tolerance_s: float = TOLERANCE_S):
        self.root = root = Path(root)
        self.info, self.features = lerobot_features(root)
        version = str(self.info["codebase_version"])
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.episodes = sorted((_episodes_v21 if version.startswith("v2") else _episodes_v30)(
            root, self.info, self.video_keys), key=lambda e: e.index)
        tasks = _tasks(root, version)
        dopr_meta = json.loads((root / DOPR_META_PATH).read_text()) if (root / DOPR_META_PATH).is_file() else {}
        self.names = dopr_meta.get("keys", {})  # lerobot feature -> store key
        self.keep_task_index = len(tasks) > 1 and "task_index" in self.info["features"]
        self.attrs = dopr_meta.get("attrs") or {
            "obs_keys": [k for k in self.features if k.startswith("observation.")], "action_key": "action",
            "control_freq": self.info["fps"],
            "source": {"format": "lerobot", "codebase_version": version, "root": str(root)},
            "lerobot": {"robot_type": self.info.get("robot_type"), "fps": self.info["fps"],
                        "tasks": [tasks[i] for i in sorted(tasks)], "features": self.features},
        }
        columns = ["episode_index", "frame_index", "timestamp", *(k for k in self.features if k not in self.video_keys)]
        self._data = _DataFiles(columns + (["task_index"] if self.keep_task_index else []))
        self._readers = {k: VideoFrames(k, tolerance_s) for k in self.video_keys}

    def read(self, ep: _Episode) -> dict[str, np.ndarray]:
        table = self._data.rows(ep.data_path, ep.index)
        where = f"episode {ep.index} of {ep.data_path}"
        if table.num_rows != ep.length:
            raise EpisodeStoreError(f"{where}: {table.num_rows} rows, but the episode metadata gives length "
                                    f"{ep.length}")
        if ep.length == 0:
            raise EpisodeStoreError(f"{where}: the episode has no rows")
        times = table.column("timestamp").to_numpy().astype(np.float64)
        if np.any(np.diff(times) <= 0):
            raise EpisodeStoreError(f"{where}: timestamps do not increase with frame_index")
        episode = {}
        for key, feature in self.features.items():
            if key in self.video_keys:
                path, start = ep.videos[key]
                episode[key] = self._readers[key].read(path, start + times)
            elif feature["dtype"] == "image":
                episode[key] = _png_frames(table, key, ep.data_path)
            else:
                episode[key] = _column(table, key, feature, ep.data_path)
        if self.keep_task_index:
            episode["task_index"] = table.column("task_index").to_numpy()
        return {self.names.get(k, k): v for k, v in episode.items()}

    def __iter__(self):
        for ep in self.episodes:
            yield f"episode {ep.index} of {ep.data_path}", self.read(ep)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


def import_lerobot(root, out_path, overwrite: bool = False, progress: bool = True,
                   tolerance_s: float = TOLERANCE_S) -> EpisodeStore:
    """Convert the LeRobot dataset folder ``root`` to a new store at ``out_path``; return it (read-only).

    Built under a temporary name and renamed at the end: an interrupted import leaves no partial store.
    """
    from tqdm import tqdm

    root, out_path = Path(root), Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists (pass overwrite=True to replace it)")
    reader = LeRobotReader(root, tolerance_s)
    tmp = out_path.with_name(f".{out_path.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        store = EpisodeStore.create(tmp, attrs=reader.attrs)
        batch, where, size = [], [], 0
        for i, (source, episode) in enumerate(tqdm(reader, total=len(reader.episodes), desc=f"import {root.name}",
                                                   disable=not progress, unit="episode")):
            batch.append(episode)
            where.append(source)
            size += sum(v.nbytes for v in episode.values())
            if size >= APPEND_BYTES or i == len(reader.episodes) - 1:
                try:
                    store.append_episodes(batch)
                except EpisodeStoreError as err:
                    raise EpisodeStoreError(f"{where[0]} .. {where[-1]}: {err}") from err
                batch, where, size = [], [], 0
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    if out_path.exists():
        shutil.rmtree(out_path)
    os.rename(tmp, out_path)
    return EpisodeStore.open(out_path, mode="r")
