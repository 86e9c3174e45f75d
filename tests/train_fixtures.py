"""A small real episode store for the training tests: actions are a smooth function of the observations."""

from __future__ import annotations

import numpy as np


def make_store(path, n_episodes=12, length=30, image=False, seed=0):
    from dopr.data import EpisodeStore

    rng = np.random.default_rng(seed)
    obs_keys = ["eef", "object"] + (["cam"] if image else [])
    store = EpisodeStore.create(path, attrs={"task": "synthetic", "obs_keys": obs_keys, "control_freq": 20,
                                             "versions": {"mujoco": "3.6.0", "robosuite": "1.5.2"}})
    for _ in range(n_episodes):
        t = np.linspace(0, 1, length)[:, None]
        goal = rng.uniform(-1, 1, (1, 3))
        eef = (goal * t + 0.05 * rng.standard_normal((length, 3))).astype(np.float32)
        obj = np.concatenate([np.repeat(goal, length, 0), np.sin(3 * t), np.cos(3 * t)], 1).astype(np.float32)
        action = np.concatenate([goal - eef, np.sin(5 * t), np.ones((length, 3)) * t], 1).astype(np.float32)
        episode = {"eef": eef, "object": obj, "action": action}
        if image:
            episode["cam"] = rng.integers(0, 256, (length, 16, 16, 3), dtype=np.uint8)
        store.append_episode(episode)
    return path
