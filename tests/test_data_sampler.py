"""Split, SequenceSampler padding, SequenceDataset windows and normalizer statistics."""

import numpy as np
import pytest
import torch

from dopr.data import EpisodeStore, SequenceDataset, SequenceSampler, compute_stats, resolve_split, split_episodes

torch.set_num_threads(1)


@pytest.fixture
def step_store(tmp_path):
    """Two episodes (lengths 3 and 5) whose values are their global step index."""
    store = EpisodeStore.create(tmp_path / "steps.zarr")
    for start, length in ((0, 3), (3, 5)):
        t = np.arange(start, start + length)
        store.append_episode({"action": np.stack([t, -t], 1).astype(np.float32), "pos": t[:, None].astype(np.float64),
                              "cam_image": np.broadcast_to(t[:, None, None, None], (length, 4, 4, 3)).astype(np.uint8)})
    return store


def test_sampler_pads_by_repeating_episode_edges(step_store):
    sampler = SequenceSampler(step_store, ["pos"], sequence_length=4, pad_before=1, pad_after=2)
    windows = [sampler.sample_sequence(i)["pos"][:, 0].tolist() for i in range(len(sampler))]
    # worked by hand: episode 0 = steps 0..2, window offsets -1..1; episode 1 = steps 3..7, offsets -1..3
    assert windows == [
        [0, 0, 1, 2], [0, 1, 2, 2], [1, 2, 2, 2],
        [3, 3, 4, 5], [3, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 7], [6, 7, 7, 7],
    ]
    only_second = SequenceSampler(step_store, ["pos"], 4, pad_before=0, pad_after=0, episode_indices=[1])
    assert [only_second.sample_sequence(i)["pos"][:, 0].tolist() for i in range(len(only_second))] == [
        [3, 4, 5, 6], [4, 5, 6, 7]]
    # an episode shorter than an unpadded window gives no window (diffusion_policy drops it too)
    assert len(SequenceSampler(step_store, ["pos"], 4, episode_indices=[0])) == 0


def test_sampler_batch_matches_items_and_images_on_disk(step_store):
    kw = dict(sequence_length=4, pad_before=1, pad_after=2, key_first_k={"cam_image": 2})
    on_disk = SequenceSampler(step_store, ["pos", "cam_image"], cache_images=False, **kw)
    cached = SequenceSampler(step_store, ["pos", "cam_image"], cache_images=True, **kw)
    assert not isinstance(on_disk._arrays["cam_image"], np.ndarray)
    assert isinstance(SequenceSampler(step_store, ["cam_image"], 4)._arrays["cam_image"], np.ndarray)  # small: cached
    batch = on_disk.sample_batch([7, 0, 3])
    assert batch["pos"].shape == (3, 4, 1) and batch["cam_image"].shape == (3, 2, 4, 4, 3)
    for row, i in enumerate([7, 0, 3]):
        item = cached.sample_sequence(i)
        np.testing.assert_array_equal(batch["pos"][row], item["pos"])
        np.testing.assert_array_equal(batch["cam_image"][row], item["cam_image"])
        np.testing.assert_array_equal(item["cam_image"][:, 0, 0, 0], item["pos"][:2, 0])


def test_split_is_seeded_episode_level_and_recorded(tmp_path):
    train, val = split_episodes(50, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(50))
    np.testing.assert_array_equal(split_episodes(50, 0.2, seed=3)[1], val)
    assert not np.array_equal(split_episodes(50, 0.2, seed=4)[1], val)
    assert len(split_episodes(2, 0.01, 0)[1]) == 1 and len(split_episodes(1, 0.5, 0)[1]) == 0

    store = EpisodeStore.create(tmp_path / "s.zarr")
    for _ in range(10):
        store.append_episode({"action": np.zeros((4, 2), np.float32)})
    train, val = resolve_split(store, val_ratio=0.3, seed=1)
    rec = EpisodeStore.open(store.path).attrs["split"]
    assert rec["val"] == val.tolist() and rec["seed"] == 1 and rec["n_episodes"] == 10
    # a read-only store reuses the recorded split; robomimic-style fixed splits always win
    reader = EpisodeStore.open(store.path)
    np.testing.assert_array_equal(resolve_split(reader, 0.3, 1)[1], val)
    store.attrs["split"] = {"source": "robomimic", "train": [0, 1, 2], "val": [9]}
    assert resolve_split(EpisodeStore.open(store.path), 0.5, 7)[1].tolist() == [9]


def test_dataset_windows_follow_the_convention(step_store):
    To, Tp = 2, 4
    ds = SequenceDataset(step_store, ["pos", "cam_image"], n_obs_steps=To, horizon=Tp, split="all")
    # every step t of every episode is a current step: 3 + 5 windows
    assert len(ds) == 8
    item = ds[4]  # episode 1, current step t = 4 (global): window starts at t - (To - 1) = 3
    assert item["obs"]["pos"].dtype == torch.float32 and item["obs"]["pos"].shape == (To, 1)
    assert item["obs"]["cam_image"].dtype == torch.uint8 and item["obs"]["cam_image"].shape == (To, 4, 4, 3)
    assert item["action"].dtype == torch.float32 and item["action"].shape == (Tp, 2)
    assert item["obs"]["pos"][:, 0].tolist() == [3, 4]
    assert item["action"][:, 0].tolist() == [3, 4, 5, 6]
    # the last current step t = 7 of an episode: action[To-1] is t's, later ones repeat the last step
    assert ds[7]["obs"]["pos"][:, 0].tolist() == [6, 7] and ds[7]["action"][:, 0].tolist() == [6, 7, 7, 7]
    assert ds[0]["obs"]["pos"][:, 0].tolist() == [0, 0]
    batch = ds[np.array([4, 7])]
    assert batch["obs"]["cam_image"].shape == (2, To, 4, 4, 3) and batch["action"].shape == (2, Tp, 2)
    torch.testing.assert_close(batch["action"][1], ds[7]["action"])
    # diffusion_policy's pad_after = Ta - 1
    assert len(SequenceDataset(step_store, ["pos"], To, Tp, split="all", n_action_steps=1)) == 1 + 3
    with pytest.raises(KeyError, match="no key data/nope"):
        SequenceDataset(step_store, ["nope"], To, Tp)


def test_dataset_works_with_a_dataloader_in_batches(step_store):
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    ds = SequenceDataset(step_store, ["pos"], 2, 4, split="all")
    loader = DataLoader(ds, batch_size=None, sampler=BatchSampler(RandomSampler(ds), 3, drop_last=True))
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["obs"]["pos"].shape == (3, 2, 1)
    plain = next(iter(DataLoader(ds, batch_size=4)))  # the per-item path with default collation
    assert plain["action"].shape == (4, 4, 2)


def test_stats_on_train_split_match_numpy(tmp_path, rng):
    store = EpisodeStore.create(tmp_path / "st.zarr")
    episodes = []
    for i in range(12):
        ep = {"action": rng.normal(i, 1 + i, size=(int(rng.integers(5, 40)), 3)).astype(np.float32),
              "pos": 1e4 + rng.normal(size=(1, 2)) * np.ones((1, 1))}
        ep["pos"] = np.repeat(ep["pos"], len(ep["action"]), axis=0) + rng.normal(size=(len(ep["action"]), 2)) * 1e-3
        episodes.append(ep)
        store.append_episode(ep)
    ds = SequenceDataset(store, ["pos"], 2, 8, split="val", val_ratio=0.25, seed=0)
    stats = ds.normalizer_stats()
    train = np.asarray(ds.train_episodes)
    assert len(train) == 9 and not set(train) & set(ds.val_episodes)
    for key in ("action", "pos"):
        ref = np.concatenate([episodes[i][key] for i in train]).astype(np.float64)
        np.testing.assert_allclose(stats[key]["mean"], ref.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key]["std"], ref.std(0), rtol=1e-4)
        np.testing.assert_array_equal(stats[key]["min"], ref.min(0).astype(np.float32))
        np.testing.assert_array_equal(stats[key]["max"], ref.max(0).astype(np.float32))
    # small read blocks merge to the same moments, and the val split gives different statistics
    small = compute_stats(store, ["action"], train, max_read_steps=7)["action"]
    np.testing.assert_allclose(small["std"], stats["action"]["std"], rtol=1e-5)
    other = compute_stats(store, ["action"], ds.val_episodes)["action"]
    assert not np.allclose(other["mean"], stats["action"]["mean"])
