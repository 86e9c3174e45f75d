"""What `make_lerobot_fixture.py` hands to lerobot's `LeRobotDataset.add_frame`, recomputed with numpy alone.

The tests compare an import of the lerobot-written fixtures with these values (low-dim exactly, frames within
AV1's error), so the values themselves are derived here rather than stored next to the fixtures.
"""

import numpy as np

SIZE, FPS, LENGTHS = 32, 10, (5, 7, 4)
TASKS = ("lift the cube", "push the cube", "lift the cube")


def frame(k: int) -> np.ndarray:
    """A smooth gradient with a bright square that moves with k: frames are told apart after compression."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    img = np.stack([60 + 120 * x, 60 + 120 * y, 90 + 30 * (x + y)], -1)
    cx, cy = (3 + 2 * k) % (SIZE - 8), (5 + 3 * k) % (SIZE - 8)
    img[cy:cy + 8, cx:cx + 8] = 230
    return img.astype(np.uint8)


def source_episodes() -> list[tuple[str, list[dict]]]:
    """(task, frame items) per episode, in the order the fixture maker adds them."""
    rng = np.random.default_rng(0)
    episodes, k = [], 0
    for length, task in zip(LENGTHS, TASKS):
        items = []
        for _ in range(length):
            items.append({"observation.images.front": frame(k),
                          "observation.state": rng.standard_normal(4).astype(np.float32),
                          "action": rng.standard_normal(3).astype(np.float32)})
            k += 1
        episodes.append((task, items))
    return episodes


def source() -> dict:
    """images, state, action (stacked over every frame) and the episode lengths."""
    items = [item for _, episode in source_episodes() for item in episode]
    return {"images": np.stack([i["observation.images.front"] for i in items]),
            "state": np.stack([i["observation.state"] for i in items]),
            "action": np.stack([i["action"] for i in items]),
            "lengths": np.array(LENGTHS)}
