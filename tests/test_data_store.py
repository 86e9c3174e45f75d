"""EpisodeStore: round trip, validation errors, diffusion_policy-layout stores, atomic append under kill."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from dopr.data import EpisodeStore, EpisodeStoreError
from dopr.data.episode_store import IMAGE_CHUNK_FRAMES, LOWDIM_CHUNK_STEPS, chunks_for


def make_episode(rng, length, image=True):
    ep = {
        "action": rng.normal(size=(length, 7)).astype(np.float32),
        "robot0_eef_pos": rng.normal(size=(length, 3)),
        "state": rng.normal(size=(length, 32)),
        "reward": rng.random(length).astype(np.float32),
    }
    if image:
        ep["agentview_image"] = rng.integers(0, 256, size=(length, 12, 12, 3), dtype=np.uint8)
    return ep


# ---- round trip -------------------------------------------------------------------------------
def test_round_trip(tmp_path, rng):
    path = tmp_path / "demo.zarr"
    store = EpisodeStore.create(path, attrs={"task": "lift", "obs_keys": ["robot0_eef_pos"], "action_key": "action"})
    episodes = [make_episode(rng, n) for n in (5, 300, 1, 17)]
    for i, ep in enumerate(episodes):
        assert store.append_episode(ep) == i

    store = EpisodeStore.open(path)
    assert store.n_episodes == 4 and store.n_steps == 323 and store.zarr_format == 3
    assert store.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(store.episode_ends, [5, 305, 306, 323])
    np.testing.assert_array_equal(store.episode_lengths, [5, 300, 1, 17])
    assert store.keys == sorted(episodes[0])
    for i, ep in enumerate(episodes):
        got = store.get_episode(i)
        for key in ep:
            np.testing.assert_array_equal(got[key], ep[key])
            assert got[key].dtype == ep[key].dtype
    np.testing.assert_array_equal(store.get_episode(-1)["action"], episodes[-1]["action"])
    assert store.attrs["task"] == "lift"
    # chunks follow the access pattern: a few frames per image chunk, long time chunks for low-dim
    assert store.array("agentview_image").chunks == (IMAGE_CHUNK_FRAMES, 12, 12, 3)
    assert chunks_for((84, 84, 3), np.uint8) == (IMAGE_CHUNK_FRAMES, 84, 84, 3)
    assert chunks_for((512, 512, 3), np.uint8) == (1, 512, 512, 3)
    assert store.array("state").chunks == (LOWDIM_CHUNK_STEPS, 32)
    assert "blosc" in str(store.array("state").metadata.codecs).lower()
    # the raw layout is diffusion_policy's
    raw = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(raw["meta/episode_ends"][:], [5, 305, 306, 323])
    np.testing.assert_array_equal(raw["data/action"][5:305], episodes[1]["action"])

    with pytest.raises(PermissionError):
        store.append_episode(episodes[0])
    with pytest.raises(IndexError, match="episode 4 out of range"):
        store.get_episode(4)

    store = EpisodeStore.open(path, mode="a")  # appending continues after reopening
    store.attrs["split"] = {"source": "seeded", "train": [0], "val": [1]}
    store.append_episode(episodes[0])
    again = EpisodeStore.open(path)
    assert again.n_episodes == 5 and again.attrs["split"]["val"] == [1]
    np.testing.assert_array_equal(again.get_episode(4)["state"], episodes[0]["state"])


def test_batched_append_equals_single_appends_and_is_all_or_nothing(tmp_path, rng):
    episodes = [make_episode(rng, n) for n in (5, 300, 1, 17, 40)]
    one = EpisodeStore.create(tmp_path / "one.zarr")
    for ep in episodes:
        one.append_episode(ep)
    batched = EpisodeStore.create(tmp_path / "batched.zarr")
    assert batched.append_episodes(episodes[:3]) == [0, 1, 2]  # the first batch creates the arrays
    assert batched.append_episodes(episodes[3:]) == [3, 4]
    assert batched.append_episodes([]) == []
    batched = EpisodeStore.open(tmp_path / "batched.zarr", mode="a")
    np.testing.assert_array_equal(batched.episode_ends, EpisodeStore.open(tmp_path / "one.zarr").episode_ends)
    for i, ep in enumerate(episodes):
        for key, value in batched.get_episode(i).items():
            np.testing.assert_array_equal(value, ep[key])
    # one bad episode in a batch: none of the batch is stored, and the error names its index
    bad = make_episode(rng, 4)
    bad["state"] = bad["state"][:3]
    with pytest.raises(EpisodeStoreError, match="episode 6"):
        batched.append_episodes([make_episode(rng, 4), bad])
    reopened = EpisodeStore.open(tmp_path / "batched.zarr")
    assert reopened.n_episodes == 5 and reopened.n_steps == 363
    reopened.validate(full=True)


def test_create_refuses_existing_and_open_a_creates(tmp_path, rng):
    path = tmp_path / "s.zarr"
    EpisodeStore.create(path)
    with pytest.raises(FileExistsError):
        EpisodeStore.create(path)
    with pytest.raises(FileNotFoundError, match="no episode store"):
        EpisodeStore.open(tmp_path / "missing.zarr")
    store = EpisodeStore.open(tmp_path / "new.zarr", mode="a")
    store.append_episode(make_episode(rng, 4, image=False))
    assert EpisodeStore.open(tmp_path / "new.zarr").n_steps == 4


# ---- validation: append -----------------------------------------------------------------------
@pytest.fixture
def filled(tmp_path, rng):
    store = EpisodeStore.create(tmp_path / "v.zarr")
    store.append_episode(make_episode(rng, 6))
    store.append_episode(make_episode(rng, 4))
    return store


def _bad(rng, **change):
    ep = make_episode(rng, 5)
    for key, value in change.items():
        if value is None:
            del ep[key]
        else:
            ep[key] = value
    return ep


@pytest.mark.parametrize("change, message", [
    (dict(state=None), r"episode 2 is missing key\(s\) \['state'\]"),
    (dict(extra=np.zeros((5, 2))), r"episode 2 has key\(s\) \['extra'\] that the store does not have"),
    (dict(action=np.zeros((6, 7), np.float32)), r"arrays of episode 2 have different lengths"),
    (dict(state=np.where(np.arange(5)[:, None] == 3, np.nan, np.zeros((5, 32)))),
     r"data/state of episode 2 has NaN or inf at step 3"),
    (dict(reward=np.array([0, 0, np.inf, 0, 0], np.float32)), r"data/reward of episode 2 has NaN or inf at step 2"),
    (dict(action=np.zeros((5, 7), np.int64)), r"data/action of episode 2 has dtype int64; actions must be floating"),
    (dict(agentview_image=np.zeros((5, 12, 12, 3), np.float32)), r"data/agentview_image of episode 2 .* must be uint8"),
    (dict(state=np.array([["a"] * 32] * 5)), r"data/state of episode 2 has dtype <U1"),
    (dict(state=np.zeros((5, 31))), r"data/state of episode 2 has per-step shape \(31,\); the store has \(32,\)"),
])
def test_append_rejects_bad_episode(filled, rng, change, message):
    with pytest.raises(EpisodeStoreError, match=message) as err:
        filled.append_episode(_bad(rng, **change))
    assert str(filled.path) in str(err.value)
    assert EpisodeStore.open(filled.path).n_episodes == 2  # nothing was written


def test_append_rejects_dtype_of_another_kind(tmp_path, rng):
    store = EpisodeStore.create(tmp_path / "k.zarr")
    store.append_episode({"action": np.zeros((3, 2), np.float32), "count": np.zeros(3, np.int32)})
    with pytest.raises(EpisodeStoreError, match=r"data/count of episode 1 has dtype float64; the store has int32"):
        store.append_episode({"action": np.zeros((3, 2), np.float32), "count": np.zeros(3)})
    with pytest.raises(EpisodeStoreError, match="episode 1 has no steps"):
        store.append_episode({"action": np.zeros((0, 2), np.float32), "count": np.zeros(0, np.int32)})


# ---- validation: stores corrupted on disk -----------------------------------------------------
def _write_raw(path, ends, data, zarr_format=3, attrs=None):
    """A store written with plain zarr, the way another tool (or a bug) would."""
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    meta = g.create_group("meta")
    ends = np.asarray(ends)
    meta.create_array("episode_ends", shape=ends.shape, dtype=ends.dtype)[:] = ends
    d = g.create_group("data")
    for key, value in data.items():
        d.create_array(key, shape=value.shape, dtype=value.dtype)[:] = value
    if attrs:
        g.attrs.update(attrs)
    return path


@pytest.mark.parametrize("ends, data, attrs, message", [
    ([3, 2, 6], {"action": np.zeros((6, 2), np.float32)}, None,
     r"meta/episode_ends is not increasing at episode 1: ends at 2 after episode 0 ended at 3"),
    ([3, 3, 6], {"action": np.zeros((6, 2), np.float32)}, None, r"not increasing at episode 1"),
    ([0, 6], {"action": np.zeros((6, 2), np.float32)}, None, r"out of range at episode 0"),
    ([3, 5, 9], {"action": np.zeros((9, 2), np.float32), "obs": np.zeros((7, 4))}, None,
     r"arrays of different lengths: data/obs has 7 steps but meta/episode_ends says 9; episode 2"),
    ([3, 12], {"action": np.zeros((6, 2), np.float32)}, None,
     r"data/action has 6 steps but meta/episode_ends says 12; episode 1 .* out of range"),
    (np.array([3.0, 6.0]), {"action": np.zeros((6, 2), np.float32)}, None,
     r"meta/episode_ends has dtype float64 .* expected a 1-D integer array"),
    ([3, 6], {"action": np.zeros((6, 2), np.int16)}, None, r"data/action has dtype int16; actions must be floating"),
    ([3, 6], {"action": np.zeros((6, 2), np.float32)}, {"obs_keys": ["robot0_eef_pos"], "action_key": "action"},
     r"missing key data/robot0_eef_pos"),
])
def test_open_rejects_corrupt_store(tmp_path, ends, data, attrs, message):
    path = _write_raw(tmp_path / "bad.zarr", ends, data, attrs=attrs)
    with pytest.raises(EpisodeStoreError, match=message) as err:
        EpisodeStore.open(path)
    assert str(path) in str(err.value)


def test_missing_episode_ends_and_not_a_group(tmp_path):
    g = zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    g.create_group("data")
    with pytest.raises(EpisodeStoreError, match="missing meta/episode_ends"):
        EpisodeStore.open(tmp_path / "x.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(EpisodeStoreError, match="not a zarr group"):
        EpisodeStore.open(tmp_path / "plain")


def test_full_validation_finds_nan_with_episode_and_step(tmp_path):
    obs = np.zeros((10, 3))
    obs[7, 1] = np.nan
    path = _write_raw(tmp_path / "nan.zarr", [4, 6, 10], {"action": np.zeros((10, 2), np.float32), "obs": obs})
    store = EpisodeStore.open(path)  # the cheap checks do not read data
    with pytest.raises(EpisodeStoreError, match=r"data/obs has NaN or inf in episode 2 at step 1 \(global step 7\)"):
        store.validate(full=True)


# ---- stores written by diffusion_policy (zarr v2 and v3) ----------------------------------------
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_diffusion_policy_layout_opens(tmp_path, rng, zarr_format):
    import numcodecs

    path = tmp_path / "pusht_cchi_v7_replay.zarr"
    ends = np.array([40, 100, 130], dtype=np.int64)
    action = rng.normal(size=(130, 2)).astype(np.float32)
    state = rng.normal(size=(130, 5)).astype(np.float32)
    img = rng.integers(0, 256, size=(130, 16, 16, 3), dtype=np.uint8)
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    kw = {"compressors": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.NOSHUFFLE)} if zarr_format == 2 else {}
    g.create_group("meta").create_array("episode_ends", shape=(3,), dtype="int64", chunks=(3,), **kw)[:] = ends
    d = g.create_group("data")
    d.create_array("action", shape=action.shape, dtype="float32", chunks=(100, 2), **kw)[:] = action
    d.create_array("state", shape=state.shape, dtype="float32", chunks=(100, 5), **kw)[:] = state
    d.create_array("img", shape=img.shape, dtype="uint8", chunks=(1, 16, 16, 3), **kw)[:] = img
    if zarr_format == 2:
        assert (path / ".zgroup").exists() and (path / "data" / "action" / ".zarray").exists()

    store = EpisodeStore.open(path)
    assert store.zarr_format == zarr_format
    assert store.n_episodes == 3 and store.keys == ["action", "img", "state"]
    np.testing.assert_array_equal(store.get_episode(1)["state"], state[40:100])
    np.testing.assert_array_equal(store.get_episode(2)["img"], img[100:])
    store.validate(full=True)

    store = EpisodeStore.open(path, mode="a")  # and appends keep its format
    store.append_episode({"action": action[:5], "state": state[:5], "img": img[:5]})
    reopened = EpisodeStore.open(path)
    assert reopened.zarr_format == zarr_format and reopened.n_episodes == 4
    np.testing.assert_array_equal(reopened.get_episode(3)["action"], action[:5])


def test_zipped_diffusion_policy_store_opens_read_only(tmp_path):
    from zarr.storage import ZipStore

    path = tmp_path / "image_abs.zarr.zip"
    zip_store = ZipStore(path, mode="w")
    g = zarr.open_group(zip_store, mode="w", zarr_format=2)
    g.create_group("meta").create_array("episode_ends", shape=(2,), dtype="int64")[:] = [3, 5]
    g.create_group("data").create_array("action", shape=(5, 2), dtype="float32")[:] = np.arange(10).reshape(5, 2)
    zip_store.close()
    store = EpisodeStore.open(path)
    np.testing.assert_array_equal(store.get_episode(1)["action"], [[6, 7], [8, 9]])
    with pytest.raises(PermissionError, match="read-only"):
        EpisodeStore.open(path, mode="a")


def test_death_just_before_the_commit_leaves_the_previous_episodes(tmp_path, rng, monkeypatch):
    """The episode_ends value is already in its chunk when the writer dies before the shape update:
    the store must still show the old count, and the next append must work."""
    store = EpisodeStore.create(tmp_path / "c.zarr")
    first = make_episode(rng, 7)
    store.append_episode(first)
    resize = zarr.Array.resize

    def dying_resize(self, shape, *a, **kw):
        if self.path.endswith("episode_ends"):
            raise KeyboardInterrupt  # the process stops here
        return resize(self, shape, *a, **kw)

    monkeypatch.setattr(zarr.Array, "resize", dying_resize)
    with pytest.raises(KeyboardInterrupt):
        store.append_episode(make_episode(rng, 5))
    monkeypatch.undo()
    reader = EpisodeStore.open(store.path)
    assert reader.n_episodes == 1 and reader.array("action").shape[0] == 12  # written, not committed
    writer = EpisodeStore.open(store.path, mode="a")
    assert writer.array("action").shape[0] == 7
    third = make_episode(rng, 3)
    writer.append_episode(third)
    again = EpisodeStore.open(store.path)
    np.testing.assert_array_equal(again.episode_ends, [7, 10])
    np.testing.assert_array_equal(again.get_episode(1)["state"], third["state"])


# ---- atomic append under a real SIGKILL -------------------------------------------------------
WRITER = r"""
import sys, numpy as np
from dopr.data import EpisodeStore

def episode(i):
    # content determined by the episode's index, so a reader can check every committed episode
    n = 150 + 97 * (i % 5)
    t = np.arange(n)
    return {"action": np.tile((i * 1000 + t)[:, None], (1, 7)).astype(np.float32),
            "state": np.tile((i * 1000 + t)[:, None], (1, 40)).astype(np.float64),
            "frame": np.full((n, 8, 8, 3), i % 251, np.uint8)}

store = EpisodeStore.open(sys.argv[1], mode="a")
for i in range(store.n_episodes, 10_000):
    print("start", i, flush=True)
    store.append_episode(episode(i))
    print("done", i, flush=True)
"""


def _check_committed(path, writer_globals):
    store = EpisodeStore.open(path)
    store.validate(full=True)
    for i in range(store.n_episodes):
        expected = writer_globals["episode"](i)
        got = store.get_episode(i)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"episode {i} key {key}")
    return store.n_episodes


def test_append_is_atomic_under_sigkill(tmp_path):
    path = tmp_path / "killed.zarr"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer_globals = {}
    exec(WRITER.split("store = ")[0], writer_globals)  # the episode() of the writer, without running it
    rng = np.random.default_rng(1)
    counts, mid_episode_kills = [], 0
    for target in (1, 2, 3, 2, 3):  # kill while writing the target-th episode of each run (1: the store's first)
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        started = 0
        for line in proc.stdout:
            started += line.startswith("start")
            if started == target:
                break
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        lines = [line, *proc.stdout.read().splitlines()]
        proc.wait()
        mid_episode_kills += lines[-1].startswith("start")  # killed between "start i" and "done i"
        counts.append(_check_committed(path, writer_globals))
        # reopening for appending discards what the killed append left behind
        store = EpisodeStore.open(path, mode="a")
        assert all(store.array(k).shape[0] == store.n_steps for k in store.keys)
        assert not list(path.rglob("*.partial"))
    assert counts == sorted(counts) and counts[-1] >= 6, counts
    print("episodes after each kill", counts, "kills inside an append", mid_episode_kills)
    assert mid_episode_kills >= 1, "no kill landed inside an append; the test did not exercise atomicity"


def _store_with_nan_action(tmp_path, rng):
    """A real store written by EpisodeStore (which refuses NaN on append), then corrupted the way a bad
    tool or a flipped bit would: one action value of episode 2 step 3 set to NaN in place."""
    store = EpisodeStore.create(tmp_path / "nan.zarr", attrs={"task": "lift"})
    for length in (5, 7, 6):
        store.append_episode(make_episode(rng, length, image=False))
    zarr.open_group(str(store.path), mode="a")["data/action"][5 + 7 + 3, 4] = np.nan
    return store.path


def test_check_finite_names_store_key_episode_and_step(tmp_path, rng):
    from dopr.data import check_finite

    path = _store_with_nan_action(tmp_path, rng)
    store = EpisodeStore.open(path)  # the cheap checks pass: the layout is fine
    with pytest.raises(EpisodeStoreError) as err:
        check_finite(path)
    assert str(err.value) == f"{path}: data/action has NaN or inf in episode 2 at step 3 (global step 15)"
    with pytest.raises(EpisodeStoreError, match=r"data/action has NaN or inf in episode 2 at step 3"):
        check_finite(store, keys=["robot0_eef_pos", "action"])
    check_finite(store, keys=["robot0_eef_pos", "state"])  # the other keys are clean
    with pytest.raises(EpisodeStoreError, match=r"nan.zarr: no key\(s\) \['obs'\]"):
        check_finite(store, keys=["obs"])
