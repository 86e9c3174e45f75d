"""What LeRobotDataset v3.0 (and v2.1) folders look like, shared by the importer and the exporter.

lerobot 0.4.4 writes (paths relative to the dataset root):

    meta/info.json                               codebase_version, fps, features, path templates, totals
    meta/stats.json                              per feature: min, max, mean, std, count, q01..q99
    meta/tasks.parquet                           task strings and their task_index
    meta/episodes/chunk-000/file-000.parquet     one row per episode: length, dataset_from/to_index,
                                                 data/{chunk,file}_index, videos/<key>/{chunk,file}_index,
                                                 videos/<key>/{from,to}_timestamp, stats/<feature>/<stat>
    data/chunk-000/file-000.parquet              one row per frame, several episodes per file
    videos/<key>/chunk-000/file-000.mp4          several episodes per file, one after another in time

A frame of episode e is found in its video at ``videos/<key>/from_timestamp`` of e plus the row's
``timestamp``. v2.1 had one parquet and one mp4 per episode (``meta/episodes.jsonl``,
``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``) and starts every video at 0.

pyarrow and PyAV are an optional extra: ``require`` imports them with an error naming the install command.
"""

from __future__ import annotations

import numpy as np

from dopr import lazy

CODEBASE_VERSION = "v3.0"

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
# written next to lerobot's files by `dopr data export-lerobot`: the store's own key names and attrs,
# so that importing the export gives the store back (lerobot ignores files it does not know)
DOPR_META_PATH = "meta/dopr.json"

# the bookkeeping columns every LeRobot dataset has; not data a policy consumes
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
NUMERIC_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                            "float16", "float32", "float64"})
CAMERA_DTYPES = frozenset({"video", "image"})
# lerobot's stats.json quantiles (compute_stats.DEFAULT_QUANTILES)
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
# lerobot subsamples frames for image statistics; so do we, to keep the export's cost bounded
MAX_STATS_FRAMES = 100


def require(module: str):
    """Import pyarrow / av (and their submodules), or exit naming the extra that provides them."""
    return lazy.require(module, "lerobot", "the LeRobot format (pyarrow and PyAV)")


def feature_stats(values: np.ndarray, camera: bool) -> dict[str, np.ndarray]:
    """lerobot's per-feature statistics of ``values`` (N, ...): per dimension for vectors, per channel
    in [0, 1] with shape (C, 1, 1) for camera frames (N, H, W, C)."""
    if camera:
        stride = max(1, len(values) // MAX_STATS_FRAMES)
        x = values[::stride].astype(np.float64).reshape(-1, values.shape[-1]) / 255.0
        shape = (values.shape[-1], 1, 1)
    else:
        x = values.astype(np.float64).reshape(len(values), -1)
        shape = x.shape[1:]
    stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    stats.update({f"q{round(q * 100):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
    stats = {k: v.reshape(shape) for k, v in stats.items()}
    stats["count"] = np.array([len(values)])
    return stats


def aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Statistics over all episodes from each episode's (lerobot's aggregate_stats): exact min, max,
    mean and std; quantiles are the count-weighted mean of the episodes' quantiles."""
    counts = np.array([float(s["count"][0]) for s in per_episode])
    w = (counts / counts.sum()).reshape(-1, *([1] * per_episode[0]["mean"].ndim))
    means = np.stack([s["mean"] for s in per_episode])
    mean = (w * means).sum(0)
    second = (w * (np.stack([s["std"] for s in per_episode]) ** 2 + means**2)).sum(0)
    out = {"min": np.min([s["min"] for s in per_episode], axis=0),
           "max": np.max([s["max"] for s in per_episode], axis=0), "mean": mean,
           "std": np.sqrt(np.maximum(second - mean**2, 0.0))}
    for key in per_episode[0]:
        if key.startswith("q"):
            out[key] = (w * np.stack([s[key] for s in per_episode])).sum(0)
    out["count"] = np.array([int(counts.sum())])
    return out
