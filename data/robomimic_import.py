"""Import a robomimic hdf5 dataset into an EpisodeStore.

robomimic's layout: data/demo_N/{obs/<key>, actions, states, rewards, dones}, data.attrs["env_args"]
(json: env_name, env_kwargs, ...), and optional mask/<name> datasets of demo names (mask/train and
mask/valid are its train/validation split). Demos are ordered by N as an integer (demo_10 after
demo_9), and episode i of the store is the i-th demo in that order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from dopr.data.episode_store import EpisodeStore
from dopr.data.validate import EpisodeStoreError

# robomimic/robosuite env name -> dopr task name (where dopr has the task)
ROBOMIMIC_TASKS = {"Lift": "lift", "PickPlaceCan": "can", "NutAssemblySquare": "square", "Stack": "stack",
                   "ToolHang": "tool_hang", "TwoArmTransport": "transport"}

# robomimic dataset name -> store key
DEMO_KEYS = {"actions": "action", "states": "state", "rewards": "reward", "dones": "done"}


def _demo_names(path, data) -> list[str]:
    names = list(data.keys())
    bad = [n for n in names if not re.fullmatch(r"demo_\d+", n)]
    if bad:
        raise EpisodeStoreError(f"{path}: data/ holds {bad[:3]}, expected only demo_<N> groups")
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def import_robomimic(hdf5_path, out_path, overwrite: bool = False, progress: bool = True) -> EpisodeStore:
    """Convert `hdf5_path` to a new store at `out_path` and return it (open for reading).

    The store is built under a temporary name and renamed at the end, so an interrupted import
    leaves no partial store behind.
    """
    import h5py

    hdf5_path, out_path = Path(hdf5_path), Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists (pass overwrite=True to replace it)")
    tmp = out_path.with_name(f".{out_path.name}.importing-{os.getpid()}")
    with h5py.File(hdf5_path, "r") as f:
        if "data" not in f:
            raise EpisodeStoreError(f"{hdf5_path}: no 'data' group; not a robomimic dataset")
        data = f["data"]
        names = _demo_names(hdf5_path, data)
        if not names:
            raise EpisodeStoreError(f"{hdf5_path}: data/ has no demos")
        env_meta = json.loads(data.attrs["env_args"]) if "env_args" in data.attrs else {}
        obs_keys = sorted(data[names[0]]["obs"].keys()) if "obs" in data[names[0]] else []
        clash = sorted(set(obs_keys) & set(DEMO_KEYS.values()))
        if clash:
            raise EpisodeStoreError(f"{hdf5_path}: observation key(s) {clash} collide with store keys")
        order = {name: i for i, name in enumerate(names)}
        masks = {}
        for mask_name in f["mask"].keys() if "mask" in f else []:
            demos = [d.decode() if isinstance(d, bytes) else str(d) for d in f["mask"][mask_name][:]]
            unknown = [d for d in demos if d not in order]
            if unknown:
                raise EpisodeStoreError(f"{hdf5_path}: mask/{mask_name} names {unknown[:3]}, not in data/")
            masks[mask_name] = sorted(order[d] for d in demos)
        attrs = {
            "task": ROBOMIMIC_TASKS.get(env_meta.get("env_name"), env_meta.get("env_name")),
            "obs_keys": obs_keys, "action_key": "action", "env_meta": env_meta,
            "source": {"format": "robomimic", "file": hdf5_path.name}, "demo_names": names, "masks": masks,
        }
        control_freq = env_meta.get("env_kwargs", {}).get("control_freq")
        if control_freq is not None:
            attrs["control_freq"] = control_freq
        if "train" in masks and "valid" in masks:
            attrs["split"] = {"source": "robomimic", "train": masks["train"], "val": masks["valid"]}

        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _import_demos(hdf5_path, data, names, obs_keys, EpisodeStore.create(tmp, attrs=attrs), progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out_path.exists():
        shutil.rmtree(out_path)
    os.rename(tmp, out_path)
    return EpisodeStore.open(out_path, mode="r")


def _import_demos(hdf5_path, data, names, obs_keys, store, progress) -> None:
    from tqdm import tqdm

    for name in tqdm(names, desc=f"import {hdf5_path.name}", disable=not progress):
        demo = data[name]
        have = sorted(demo["obs"].keys()) if "obs" in demo else []
        if have != obs_keys:
            raise EpisodeStoreError(f"{hdf5_path}: data/{name}/obs has keys {have}, but {names[0]} has {obs_keys}")
        episode = {store_key: np.asarray(demo[h5_key]) for h5_key, store_key in DEMO_KEYS.items() if h5_key in demo}
        if "action" not in episode:
            raise EpisodeStoreError(f"{hdf5_path}: data/{name} has no 'actions'")
        episode.update({k: np.asarray(demo["obs"][k]) for k in obs_keys})
        try:
            store.append_episode(episode)
        except EpisodeStoreError as err:
            raise EpisodeStoreError(f"{hdf5_path}: data/{name}: {err}") from err
