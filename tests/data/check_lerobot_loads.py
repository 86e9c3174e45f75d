"""Load a folder with lerobot's own LeRobotDataset and save what it returns (run in a venv with lerobot).

    lerobot-venv/bin/python tests/data/check_lerobot_loads.py ROOT OUT.npz

Every item is read through LeRobotDataset.__getitem__ (parquet rows, and frames decoded from the mp4
at the episode's from_timestamp + timestamp with lerobot's 1e-4 s tolerance); camera frames are saved
as uint8 HWC, the rest as they come, so the caller can compare them with the store that was exported.
"""

import sys

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

root, out = sys.argv[1], sys.argv[2]
ds = LeRobotDataset("local/check", root=root, video_backend="pyav")
print(ds)
items = [ds[i] for i in range(len(ds))]
arrays = {}
for key in items[0]:
    if key == "task":
        continue
    values = np.stack([np.asarray(item[key]) for item in items])
    if key in ds.meta.camera_keys:  # float CHW in [0, 1] -> uint8 HWC
        values = np.round(values.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    arrays[key] = values
arrays["task"] = np.array([item["task"] for item in items])
np.savez(out, **arrays)
print({k: (v.shape, v.dtype) for k, v in arrays.items()})
print("episodes", ds.meta.total_episodes, "frames", ds.num_frames, "stats keys", sorted(ds.meta.stats))
