"""Write tests/data/lerobot_v30_tiny with lerobot itself (not a dopr dependency; see README.md there).

    python -m venv lerobot-venv && lerobot-venv/bin/pip install lerobot==0.4.4
    lerobot-venv/bin/python tests/data/make_lerobot_fixture.py tests/data/lerobot_v30_tiny
    lerobot-venv/bin/python tests/data/make_lerobot_fixture.py tests/data/lerobot_v30_images --images

3 episodes (5, 7 and 4 frames) at 10 fps of a 32x32 camera, a 4-dim state and a 3-dim action, with two
task strings; lerobot's defaults otherwise (AV1 video, several episodes per mp4 and per parquet).
With --images the camera is an ``image`` feature instead (PNG bytes inside the parquet, no video).
The frames and values it was given are saved in source.npz next to it, for the tests to compare with.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

SIZE, FPS, LENGTHS = 32, 10, (5, 7, 4)
TASKS = ("lift the cube", "push the cube", "lift the cube")


def frame(k: int) -> np.ndarray:
    """A smooth gradient with a bright square that moves with k: frames are told apart after compression."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    img = np.stack([60 + 120 * x, 60 + 120 * y, 90 + 30 * (x + y)], -1)
    cx, cy = (3 + 2 * k) % (SIZE - 8), (5 + 3 * k) % (SIZE - 8)
    img[cy:cy + 8, cx:cx + 8] = 230
    return img.astype(np.uint8)


def main(root: Path, images: bool) -> None:
    shutil.rmtree(root, ignore_errors=True)
    features = {
        "observation.images.front": {"dtype": "image" if images else "video", "shape": (SIZE, SIZE, 3),
                                     "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": (3,), "names": ["dx", "dy", "dz"]},
    }
    ds = LeRobotDataset.create("dopr/tiny", fps=FPS, features=features, root=root, use_videos=not images)
    rng = np.random.default_rng(0)
    source = {"images": [], "state": [], "action": [], "lengths": np.array(LENGTHS)}
    k = 0
    for length, task in zip(LENGTHS, TASKS):
        for _ in range(length):
            item = {"observation.images.front": frame(k),
                    "observation.state": rng.standard_normal(4).astype(np.float32),
                    "action": rng.standard_normal(3).astype(np.float32)}
            source["images"].append(item["observation.images.front"])
            source["state"].append(item["observation.state"])
            source["action"].append(item["action"])
            ds.add_frame({**item, "task": task})
            k += 1
        ds.save_episode()
    ds.finalize()
    np.savez_compressed(root / "source.npz", **{k: np.asarray(v) for k, v in source.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), images="--images" in sys.argv[2:])
