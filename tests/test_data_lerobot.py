"""LeRobotDataset v3.0 in and out: a dataset lerobot 0.4.4 wrote (tests/data/lerobot_v30_tiny: its parquet and
metadata; its mp4 is encoded here, as lerobot encodes, from the same frames), round trips store -> LeRobot -> store,
v2.1 folders, and the errors a user gets for broken datasets."""

import json
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason='LeRobot datasets need the extra: pip install -e ".[lerobot]"')
pytest.importorskip("av", reason='LeRobot datasets need the extra: pip install -e ".[lerobot]"')

from dopr.data import EpisodeStore, EpisodeStoreError  # noqa: E402
from dopr.data.lerobot_export import export_lerobot  # noqa: E402
from dopr.data.lerobot_import import import_lerobot  # noqa: E402
from dopr.data.lerobot_video import VideoWriter, video_info  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "lerobot_v30_tiny"


def _source_module():
    """tests/data/lerobot_fixture_source.py, what the fixtures' maker handed to lerobot (loaded by path: tests/data is
    not a package, and the maker imports the same file beside it)."""
    import importlib.util

    path = FIXTURE.parent / "lerobot_fixture_source.py"
    spec = importlib.util.spec_from_file_location("lerobot_fixture_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = _source_module().source()
VIDEO = "videos/observation.images.front/chunk-000/file-000.mp4"
# mean absolute error per pixel that crf 30 (lerobot's setting) stays under on these smooth 32x32 frames
# (measured: AV1 2.3-2.4, H.264 4.2)
CODEC_MEAN_ERROR = 6.0


def frames(first: int, n: int) -> np.ndarray:
    """The fixture source's frames first .. first + n - 1: a bright square that moves, so frames are told apart."""
    return np.stack([_source_module().frame(k) for k in range(first, first + n)])


def assert_frames_match(decoded: np.ndarray, original: np.ndarray) -> None:
    """Within codec error, and each decoded frame is closest to its own original (no shift or swap)."""
    decoded, original = decoded.astype(np.float64), original.astype(np.float64)
    assert decoded.shape == original.shape
    assert np.abs(decoded - original).mean() < CODEC_MEAN_ERROR
    distance = np.abs(decoded[:, None] - original[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(distance.argmin(axis=1), np.arange(len(original)))


def make_store(path, lengths=(7, 5, 9), seed=0):
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path, attrs={"task": "lift", "obs_keys": ["robot0_eef_pos", "agentview_image"],
                                             "control_freq": 20, "split": {"train": [0, 2], "val": [1]}})
    first = 0
    for n in lengths:
        store.append_episode({
            "robot0_eef_pos": rng.standard_normal((n, 3)).astype(np.float32),
            "agentview_image": frames(first, n),
            "action": rng.standard_normal((n, 7)),  # float64
            "reward": rng.standard_normal(n).astype(np.float32),
            "done": np.arange(n) == n - 1,
            "state": rng.integers(-5, 5, (n, 4)).astype(np.int64),
        })
        first += n
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("lerobot") / "demos.zarr")


@pytest.fixture(scope="module")
def lerobot_v30(tmp_path_factory):
    """tests/data/lerobot_v30_tiny with its mp4, which is not tracked: encoded as lerobot 0.4.4 encodes, each episode
    into its own file with lerobot's encoder settings (VideoWriter) and the files' packets joined in time (its
    concatenation), so every episode starts on a key frame as in the file lerobot wrote; what lerobot recorded of
    that file (meta/info.json) must describe this one."""
    import av

    root = tmp_path_factory.mktemp("lerobot") / "lerobot_v30_tiny"
    shutil.copytree(FIXTURE, root)
    parts, first = [], 0
    for i, n in enumerate(SOURCE["lengths"]):
        writer = VideoWriter(root / f"episode-{i}.mp4", 10)
        writer.write(SOURCE["images"][first:first + n])
        writer.close()
        parts.append(av.open(str(writer.path)))
        first += n
    (root / VIDEO).parent.mkdir(parents=True)
    with av.open(str(root / VIDEO), "w") as out:
        stream = out.add_stream_from_template(parts[0].streams.video[0], opaque=True)
        start = 0
        for part in parts:
            end = start
            for packet in part.demux(part.streams.video[0]):
                if packet.dts is None:  # the demuxer's empty end-of-stream packet
                    continue
                packet.pts, packet.dts = packet.pts + start, packet.dts + start
                end = max(end, packet.pts + packet.duration)
                packet.stream = stream
                out.mux(packet)
            start = end
    for part in parts:
        part.close()
        Path(part.name).unlink()
    recorded = json.loads((root / "meta/info.json").read_text())["features"]["observation.images.front"]["info"]
    assert video_info(root / VIDEO) == recorded
    return root


def test_the_encoded_video_is_laid_out_as_lerobot_writes_it(lerobot_v30):
    """Frames at k / 10 s in lerobot's time base, a key frame every 2 frames restarting at each episode's first."""
    import av

    with av.open(str(lerobot_v30 / VIDEO)) as container:
        stream = container.streams.video[0]
        assert stream.time_base == Fraction(1, 10240)
        decoded = [(round(frame.time, 6), frame.key_frame) for frame in container.decode(stream)]
    starts = np.concatenate([[0], np.cumsum(SOURCE["lengths"])[:-1]])
    key = [(k - starts[starts <= k].max()) % 2 == 0 for k in range(int(SOURCE["lengths"].sum()))]
    assert decoded == [(round(k / 10, 6), key[k]) for k in range(len(key))]


def test_imports_the_dataset_lerobot_wrote(lerobot_v30, tmp_path):
    out = import_lerobot(lerobot_v30, tmp_path / "fx.zarr", progress=False)
    np.testing.assert_array_equal(out.episode_ends, np.cumsum(SOURCE["lengths"]))
    assert out.keys == ["action", "observation.images.front", "observation.state", "task_index"]
    np.testing.assert_array_equal(out.array("observation.state")[:], SOURCE["state"])
    np.testing.assert_array_equal(out.array("action")[:], SOURCE["action"])
    assert out.array("observation.state").dtype == np.float32
    assert_frames_match(out.array("observation.images.front")[:], SOURCE["images"])
    np.testing.assert_array_equal(out.array("task_index")[:], [0] * 5 + [1] * 7 + [0] * 4)
    attrs = dict(out.attrs)
    assert attrs["obs_keys"] == ["observation.images.front", "observation.state"] and attrs["control_freq"] == 10
    assert attrs["lerobot"]["tasks"] == ["lift the cube", "push the cube"]


def test_imports_image_features_exactly(tmp_path):
    """lerobot's ``image`` features (use_videos=False): PNG bytes in the parquet, lossless."""
    fixture = FIXTURE.parent / "lerobot_v30_images"
    out = import_lerobot(fixture, tmp_path / "im.zarr", progress=False)
    np.testing.assert_array_equal(out.episode_ends, np.cumsum(SOURCE["lengths"]))
    np.testing.assert_array_equal(out.array("observation.images.front")[:], SOURCE["images"])
    np.testing.assert_array_equal(out.array("observation.state")[:], SOURCE["state"])


@pytest.mark.parametrize("vcodec", ["libsvtav1", "h264"])
def test_round_trip_store_lerobot_store(store, tmp_path, vcodec):
    root = export_lerobot(store.path, tmp_path / "le", vcodec=vcodec, progress=False)
    videos = sorted((root / "videos").rglob("*.mp4"))
    assert [p.relative_to(root).as_posix() for p in videos] == [
        "videos/observation.images.agentview_image/chunk-000/file-000.mp4"]  # all 3 episodes in one file
    back = import_lerobot(root, tmp_path / "back.zarr", progress=False)
    np.testing.assert_array_equal(back.episode_ends, store.episode_ends)
    assert back.keys == store.keys and dict(back.attrs) == dict(store.attrs)
    for key in store.keys:
        if key == "agentview_image":
            assert_frames_match(back.array(key)[:], store.array(key)[:])
        else:  # exact, dtype included
            assert back.array(key).dtype == store.array(key).dtype
            np.testing.assert_array_equal(back.array(key)[:], store.array(key)[:])


def test_export_writes_what_lerobot_writes(store, tmp_path):
    """Compared with the folder lerobot 0.4.4 wrote: the same files, info.json entries, parquet column types."""
    pq = pytest.importorskip("pyarrow.parquet")
    root = export_lerobot(store.path, tmp_path / "le", progress=False)
    ours, theirs = (json.loads((r / "meta/info.json").read_text()) for r in (root, FIXTURE))
    assert set(ours) == set(theirs) and ours["codebase_version"] == "v3.0" and ours["fps"] == 20
    assert ours["total_episodes"] == 3 and ours["total_frames"] == 21 and ours["splits"] == {"train": "0:3"}
    video = ours["features"]["observation.images.agentview_image"]
    assert video["dtype"] == "video" and video["info"]["video.codec"] == "av1"
    assert video["info"].keys() == theirs["features"]["observation.images.front"]["info"].keys()
    assert ours["features"]["observation.robot0_eef_pos"] == {"dtype": "float32", "shape": [3], "names": None}
    assert {"next.reward", "next.done", "state", "action"} <= set(ours["features"])
    for name in ("meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet", "data/chunk-000/file-000.parquet"):
        mine, lerobots = pq.read_schema(root / name), pq.read_schema(FIXTURE / name)
        shared = [f for f in lerobots.names if f in mine.names and not f.startswith("stats/") and f != "action"]
        assert shared and all(mine.field(f).type == lerobots.field(f).type for f in shared), name
        if "episodes" in name:
            camera = "videos/observation.images.{}/from_timestamp"
            assert camera.format("agentview_image") in mine.names and camera.format("front") in lerobots.names
            assert {f.split("/", 1)[0] for f in mine.names} == {f.split("/", 1)[0] for f in lerobots.names}
    # vectors as fixed-size lists, as datasets writes them (the store's action is float64, lerobot's float32)
    assert str(pq.read_schema(root / "data/chunk-000/file-000.parquet").field("action").type) == \
        "fixed_size_list<element: double>[7]"
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert episodes["dataset_from_index"] == [0, 7, 12] and episodes["length"] == [7, 5, 9]
    assert episodes["videos/observation.images.agentview_image/from_timestamp"] == [0.0, 0.35, 0.6]
    assert episodes["tasks"] == [["lift"]] * 3
    stats = json.loads((root / "meta/stats.json").read_text())
    np.testing.assert_allclose(stats["action"]["mean"], store.array("action")[:].mean(0), atol=1e-12)
    np.testing.assert_allclose(stats["action"]["std"], store.array("action")[:].std(0), atol=1e-12)
    assert np.array(stats["observation.images.agentview_image"]["mean"]).shape == (3, 1, 1)


def test_several_files_per_kind_when_the_size_limits_are_reached(store, tmp_path, monkeypatch):
    # H.264: its encoder hands out bytes 3 frames after the first, so each episode's bytes are known when
    # the next begins (SVT-AV1's lookahead is ~20 frames, longer than these episodes)
    root = export_lerobot(store.path, tmp_path / "le", vcodec="h264", progress=False, data_file_mb=1e-6,
                          video_file_mb=1e-6)
    assert len(list((root / "data").rglob("*.parquet"))) == 3
    assert len(list((root / "videos").rglob("*.mp4"))) == 3
    import dopr.data.lerobot_import

    monkeypatch.setattr(dopr.data.lerobot_import, "APPEND_BYTES", 1)  # one append per episode
    back = import_lerobot(root, tmp_path / "back.zarr", progress=False)
    np.testing.assert_array_equal(back.episode_ends, store.episode_ends)
    np.testing.assert_array_equal(back.array("action")[:], store.array("action")[:])
    assert_frames_match(back.array("agentview_image")[:], store.array("agentview_image")[:])


def write_v21(root: Path, store: EpisodeStore, fps: int = 20) -> None:
    """LeRobot's v2.1 layout: one parquet and one mp4 per episode, meta/episodes.jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = {"codebase_version": "v2.1", "fps": fps, "chunks_size": 1000,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.images.cam": {"dtype": "video", "shape": [32, 32, 3]},
                         "action": {"dtype": "float64", "shape": [7]},
                         "timestamp": {"dtype": "float32", "shape": [1]}}}
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    lines = []
    for i in range(store.n_episodes):
        ep = store.get_episode(i)
        n = len(ep["action"])
        path = root / info["data_path"].format(episode_chunk=0, episode_index=i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "action": pa.FixedSizeListArray.from_arrays(pa.array(ep["action"].ravel()), 7),
            "timestamp": pa.array((np.arange(n) / fps).astype(np.float32)),
            "frame_index": pa.array(np.arange(n)), "episode_index": pa.array(np.full(n, i))}), path)
        writer = VideoWriter(root / info["video_path"].format(episode_chunk=0, episode_index=i,
                                                              video_key="observation.images.cam"), fps, "h264")
        writer.write(ep["agentview_image"])
        writer.close()
        lines.append(json.dumps({"episode_index": i, "tasks": ["lift"], "length": n}))
    (root / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")


def test_imports_v21(store, tmp_path):
    write_v21(tmp_path / "v21", store)
    out = import_lerobot(tmp_path / "v21", tmp_path / "out.zarr", progress=False)
    np.testing.assert_array_equal(out.episode_ends, store.episode_ends)
    np.testing.assert_array_equal(out.array("action")[:], store.array("action")[:])
    assert_frames_match(out.array("observation.images.cam")[:], store.array("agentview_image")[:])


# ------------------------------------------------------------------------------------------- errors
@pytest.fixture
def broken(lerobot_v30, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(lerobot_v30, root)
    return root


def edit_info(root: Path, edit) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    edit(info)
    (root / "meta/info.json").write_text(json.dumps(info))


def test_missing_files_are_named(broken, tmp_path):
    (broken / "data/chunk-000/file-000.parquet").unlink()
    with pytest.raises(EpisodeStoreError, match=r"data/chunk-000/file-000.parquet: data file not found"):
        import_lerobot(broken, tmp_path / "x.zarr", progress=False)
    (broken / "meta/info.json").unlink()
    with pytest.raises(EpisodeStoreError, match=r"meta/info.json: not found"):
        import_lerobot(broken, tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()  # no partial store left behind


def test_missing_video_is_named(broken, tmp_path):
    (broken / VIDEO).unlink()
    with pytest.raises(EpisodeStoreError, match="file-000.mp4: video file of 'observation.images.front' not found"):
        import_lerobot(broken, tmp_path / "x.zarr", progress=False)


def test_frame_count_that_disagrees_with_the_rows(broken, tmp_path):
    writer = VideoWriter(broken / VIDEO, 10)
    writer.write(SOURCE["images"][:-1])  # the last episode loses its last frame
    writer.close()
    with pytest.raises(EpisodeStoreError, match=r"'observation.images.front' has 3 frames between 1.200000 s and "
                       r"1.500000 s, but the episode has 4 rows"):
        import_lerobot(broken, tmp_path / "x.zarr", progress=False)


def test_rows_that_disagree_with_the_episode_metadata(broken, tmp_path):
    import pyarrow.parquet as pq

    path = broken / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(path).slice(0, 14), path)  # episode 2 loses 2 of its 4 rows
    with pytest.raises(EpisodeStoreError, match="episode 2 of .*file-000.parquet: 2 rows, but the episode metadata "
                       "gives length 4"):
        import_lerobot(broken, tmp_path / "x.zarr", progress=False)


def test_unknown_dtype_is_named(broken, tmp_path):
    edit_info(broken, lambda info: info["features"]["observation.state"].update(dtype="complex64"))
    with pytest.raises(EpisodeStoreError, match="info.json: feature 'observation.state' has dtype 'complex64'"):
        import_lerobot(broken, tmp_path / "x.zarr", progress=False)


def test_a_codec_the_decoder_lacks(lerobot_v30, tmp_path, monkeypatch):
    import av

    monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libdav1d", "av1", "libaom-av1"})
    with pytest.raises(EpisodeStoreError, match="video of 'observation.images.front' is .*which this PyAV build "
                       "cannot decode"):
        import_lerobot(lerobot_v30, tmp_path / "x.zarr", progress=False)


def test_missing_extra_names_the_install_command(monkeypatch):
    from dopr.data.lerobot_format import require

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[lerobot\]"'):
        require("pyarrow.parquet")


def test_command_line(store, tmp_path, broken):
    def dopr(*args):
        return subprocess.run([sys.executable, "-m", "dopr", "data", *args], capture_output=True, text=True,
                              timeout=300)

    done = dopr("export-lerobot", str(store.path), str(tmp_path / "le"), "--vcodec", "h264")
    assert done.returncode == 0, done.stderr
    done = dopr("import-lerobot", str(tmp_path / "le"), str(tmp_path / "back.zarr"))
    assert done.returncode == 0 and "3 episodes, 21 steps" in done.stdout, done.stderr
    edit_info(broken, lambda info: info.pop("fps"))
    done = dopr("import-lerobot", str(broken), str(tmp_path / "x.zarr"))
    assert done.returncode == 1 and "dopr data import-lerobot: error:" in done.stderr
    assert "meta/info.json: missing 'fps'" in done.stderr and "Traceback" not in done.stderr


def test_the_dataset_lerobot_wrote_trains_with_dopr_train(lerobot_v30, tmp_path):
    """Imported keys keep LeRobot's names (observation.state, observation.images.front) and train as they are."""
    import torch

    from dopr.policies import load_policy

    store = import_lerobot(lerobot_v30, tmp_path / "fx.zarr", progress=False)
    done = subprocess.run([sys.executable, "-m", "dopr", "train", "--data", str(store.path),
                           "--out", str(tmp_path / "run"), "--optim", "adamw", "--steps", "4", "--batch-size", "4",
                           "--n-obs-steps", "2", "--horizon", "4", "--n-action-steps", "2", "--threads", "1",
                           "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    policy = load_policy(tmp_path / "run" / "ckpt-final")
    assert list(policy.config.obs_shapes) == ["observation.images.front", "observation.state"]
    obs = {k: torch.from_numpy(store.array(k)[:2][None]) for k in policy.config.obs_shapes}
    with torch.no_grad():
        assert policy.predict_action(obs).shape == (1, 2, 3)


def test_export_errors_name_what_is_missing(tmp_path):
    store = EpisodeStore.create(tmp_path / "s.zarr", attrs={"obs_keys": ["eef"]})
    store.append_episode({"eef": np.zeros((3, 2), np.float32), "action": np.zeros((3, 2), np.float32),
                          "task_index": np.array([0, 1, 1])})
    with pytest.raises(ValueError, match="attrs has no integer 'control_freq'.*--fps"):
        export_lerobot(store.path, tmp_path / "le", progress=False)
    with pytest.raises(EpisodeStoreError, match="data/task_index of episode 0 holds 1, but attrs.*names 1 task"):
        export_lerobot(store.path, tmp_path / "le", fps=10, progress=False)
    assert not (tmp_path / "le").exists() and not list(tmp_path.glob(".le.exporting-*"))
