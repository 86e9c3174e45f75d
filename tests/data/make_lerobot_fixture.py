"""Write tests/data/lerobot_v30_tiny with lerobot itself (not a dopr dependency; see README.md there).

    python -m venv lerobot-venv && lerobot-venv/bin/pip install lerobot==0.4.4
    lerobot-venv/bin/python tests/data/make_lerobot_fixture.py tests/data/lerobot_v30_tiny
    lerobot-venv/bin/python tests/data/make_lerobot_fixture.py tests/data/lerobot_v30_images --images

3 episodes (5, 7 and 4 frames) at 10 fps of a 32x32 camera, a 4-dim state and a 3-dim action, with two
task strings; lerobot's defaults otherwise (AV1 video, several episodes per mp4 and per parquet).
With --images the camera is an ``image`` feature instead (PNG bytes inside the parquet, no video).
The frames and values it is given come from lerobot_fixture_source.py (numpy only), which the tests call to compare.
The mp4 it writes is git-ignored: the tests encode it again from those frames (lerobot_v30_tiny/README.md).
"""

import shutil
import sys
from pathlib import Path

from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot_fixture_source import FPS, SIZE, source_episodes


def main(root: Path, images: bool) -> None:
    shutil.rmtree(root, ignore_errors=True)
    features = {
        "observation.images.front": {"dtype": "image" if images else "video", "shape": (SIZE, SIZE, 3),
                                     "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": (3,), "names": ["dx", "dy", "dz"]},
    }
    ds = LeRobotDataset.create("dopr/tiny", fps=FPS, features=features, root=root, use_videos=not images)
    for task, items in source_episodes():
        for item in items:
            ds.add_frame({**item, "task": task})
        ds.save_episode()
    ds.finalize()


if __name__ == "__main__":
    main(Path(sys.argv[1]), images="--images" in sys.argv[2:])
