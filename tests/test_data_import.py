"""`dopr data import-robomimic` on a small robomimic-layout hdf5 file, and `dopr data info`."""

import json

import h5py
import numpy as np
import pytest

from dopr.data import EpisodeStore, EpisodeStoreError, import_robomimic, split_episodes
from dopr.scripts.cli import main as dopr

# written in a shuffled order, with N past 9 so that string order (demo_10 < demo_2) is wrong
DEMO_NUMBERS = [3, 10, 0, 2, 11, 1]


def demo_arrays(n: int) -> dict:
    length = 4 + n
    t = np.arange(length, dtype=np.float64)
    return {
        "actions": np.stack([t + 100 * n] * 7, 1),
        "states": np.stack([t * 0.5 + n] * 9, 1),
        "rewards": (t == length - 1).astype(np.float64),
        "dones": (t == length - 1).astype(np.int64),
        "obs/object": np.stack([t - n] * 10, 1),
        "obs/robot0_eef_pos": np.stack([t + n] * 3, 1),
        "obs/agentview_image": np.full((length, 8, 8, 3), n, np.uint8),
    }


def write_robomimic(path, numbers=DEMO_NUMBERS, env_name="Lift", drop_obs_from=None):
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": env_name, "type": 1,
                                              "env_kwargs": {"control_freq": 20, "robots": ["Panda"]}})
        data.attrs["total"] = sum(4 + n for n in numbers)
        for n in numbers:
            g = data.create_group(f"demo_{n}")
            g.attrs["num_samples"] = 4 + n
            for name, value in demo_arrays(n).items():
                if name == "obs/object" and n == drop_obs_from:
                    continue
                g.create_dataset(name, data=value)
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_2", b"demo_3", b"demo_10", b"demo_11"]))
        f.create_dataset("mask/valid", data=np.array([b"demo_1"]))
        f.create_dataset("mask/20_percent", data=np.array([b"demo_10"]))
    return path


def test_import_robomimic(tmp_path, capsys):
    src = write_robomimic(tmp_path / "low_dim.hdf5")
    out = tmp_path / "lift.zarr"
    assert dopr(["data", "import-robomimic", str(src), str(out)]) == 0
    assert "6 episodes" in capsys.readouterr().out

    store = EpisodeStore.open(out)
    store.validate(full=True)
    order = sorted(DEMO_NUMBERS)  # episode i is demo_<i-th smallest N>
    assert store.n_episodes == 6 and store.attrs["demo_names"] == [f"demo_{n}" for n in order]
    assert store.keys == ["action", "agentview_image", "done", "object", "reward", "robot0_eef_pos", "state"]
    for i, n in enumerate(order):
        ep, ref = store.get_episode(i), demo_arrays(n)
        np.testing.assert_array_equal(ep["action"], ref["actions"])
        np.testing.assert_array_equal(ep["state"], ref["states"])
        np.testing.assert_array_equal(ep["reward"], ref["rewards"])
        np.testing.assert_array_equal(ep["object"], ref["obs/object"])
        np.testing.assert_array_equal(ep["agentview_image"], ref["obs/agentview_image"])
    attrs = store.attrs
    assert attrs["task"] == "lift" and attrs["control_freq"] == 20 and attrs["action_key"] == "action"
    assert attrs["env_meta"]["env_kwargs"]["robots"] == ["Panda"]
    assert attrs["obs_keys"] == ["agentview_image", "object", "robot0_eef_pos"]
    # the split is robomimic's masks, as episode indices in the store's order
    assert attrs["split"] == {"source": "robomimic", "train": [0, 2, 3, 4, 5], "val": [1]}
    assert attrs["masks"]["20_percent"] == [4]
    assert store.array("agentview_image").chunks[1:] == (8, 8, 3)

    from dopr.data import SequenceDataset

    val = SequenceDataset(store, ["robot0_eef_pos"], 2, 4, split="val", val_ratio=0.5, seed=9)
    assert val.episode_indices.tolist() == [1]  # the recorded split wins over val_ratio/seed

    with pytest.raises(FileExistsError):
        import_robomimic(src, out)
    with pytest.raises(SystemExit, match="holds a robomimic split"):
        dopr(["data", "split", str(out)])
    assert dopr(["data", "split", str(out), "--val-ratio", "0.5", "--seed", "3", "--force"]) == 0
    assert EpisodeStore.open(out).attrs["split"]["val"] == split_episodes(6, 0.5, 3)[1].tolist()


def test_import_errors_name_file_and_demo(tmp_path):
    src = write_robomimic(tmp_path / "bad.hdf5", drop_obs_from=10)
    with pytest.raises(EpisodeStoreError, match=r"bad.hdf5: data/demo_10/obs has keys .* but demo_0 has"):
        import_robomimic(src, tmp_path / "bad.zarr", progress=False)
    assert not (tmp_path / "bad.zarr").exists()  # nothing half-imported is left behind
    assert not list(tmp_path.glob(".bad.zarr*"))


def test_info_prints_episodes_keys_and_statistics(tmp_path, capsys):
    store = EpisodeStore.create(tmp_path / "i.zarr", attrs={"task": "reacher"})
    store.append_episode({"action": np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), "qpos": np.zeros((2, 4))})
    store.append_episode({"action": np.array([[4.0, 5.0]], np.float32), "qpos": np.ones((1, 4))})
    assert dopr(["data", "info", str(store.path), "--full", "--per-dim"]) == 0
    out = capsys.readouterr().out
    assert "episodes  2" in out and "steps     3" in out and "task      \"reacher\"" in out
    row = next(line for line in out.splitlines() if line.startswith("action "))
    # action values 0..5: min 0, max 5, mean 2.5, std sqrt(35/12) = 1.708
    assert row.split()[1:] == ["(2,)", "float32", "(256,", "2)", "0", "5", "2.5", "1.708"]
    assert "mean  [2. 3.]" in out


def test_info_without_full_reports_nan_instead_of_nan_statistics(tmp_path, capsys):
    import zarr

    store = EpisodeStore.create(tmp_path / "n.zarr", attrs={"task": "reacher"})
    for k in range(3):
        store.append_episode({"action": np.full((4, 2), k, np.float32), "qpos": np.zeros((4, 3))})
    zarr.open_group(str(store.path), mode="a")["data/action"][6, 1] = np.nan  # episode 1, step 2
    assert dopr(["data", "info", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "nan" not in out.split()  # no statistic printed as nan
    (valid,) = [line for line in out.splitlines() if line.startswith("valid ")]
    assert valid.endswith(f"NaN/inf found: {store.path}: data/action has NaN or inf in episode 1 at step 2 "
                          "(global step 6)")
    assert "layout checked" not in out
    row = next(line for line in out.splitlines() if line.startswith("qpos "))
    assert row.split()[-4:] == ["0", "0", "0", "0"]  # clean keys keep their statistics
    assert dopr(["data", "info", str(store.path), "--full"]) == 1  # the full scan finds the same place
    assert "in episode 1 at step 2" in capsys.readouterr().out


def test_data_errors_are_one_line(tmp_path, capsys):
    assert dopr(["data", "info", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dopr data: error: ") and err.count("\n") == 1 and "missing.zarr" in err
