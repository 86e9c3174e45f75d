"""Data loading time against a training step, measured side by side in one run.

    python -m dopr.data.bench [--episodes 100] [--batch 256]

Builds a Lift-sized low-dim store in a temporary folder (19-dim observation, 7-dim action),
then times, per batch: SequenceDataset's batch path (`dataset[indices]`), the per-item path
through a DataLoader with default collation, and one training step of a small MLP policy
(To*19 -> 256x3 -> Tp*7, AdamW) on one thread. The goal is batch loading < 10% of a step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

OBS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2, "object": 10}


def _time(fn, repeats: int) -> float:
    fn()  # warm up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dopr bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--length", type=int, default=150, help="steps per episode")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--obs-steps", type=int, default=2, help="To")
    p.add_argument("--horizon", type=int, default=16, help="Tp")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--image-size", type=int, default=0,
                   help="also store an agentview_image camera of this size and load it (0: low-dim only)")
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    from dopr.data import EpisodeStore, SequenceDataset

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = EpisodeStore.create(Path(tmp) / "bench.zarr")
        t0 = time.perf_counter()
        for _ in range(args.episodes):
            ep = {k: rng.normal(size=(args.length, d)) for k, d in OBS.items()}
            ep["action"] = rng.normal(size=(args.length, 7)).astype(np.float32)
            if args.image_size:  # smooth images compress like camera frames, noise would not
                ramp = np.linspace(0, 255, args.image_size, dtype=np.float32)
                frame = (ramp[:, None, None] + ramp[None, :, None] * rng.random(3)) / 2
                ep["agentview_image"] = np.repeat(frame[None].astype(np.uint8), args.length, axis=0)
            store.append_episode(ep)
        append_s = (time.perf_counter() - t0) / args.episodes
        t0 = time.perf_counter()
        image_keys = ["agentview_image"] if args.image_size else []
        ds = SequenceDataset(store, list(OBS) + image_keys, args.obs_steps, args.horizon, split="train")
        if image_keys:  # the same windows with frames read from disk instead of the memory cache
            on_disk = SequenceDataset(store, list(OBS) + image_keys, args.obs_steps, args.horizon,
                                      split="train", cache_images=False)
            disk_s = _time(lambda: on_disk[rng.integers(0, len(ds), args.batch)], max(3, args.repeats // 5))
        build_s = time.perf_counter() - t0

        model = torch.nn.Sequential(
            torch.nn.Linear(args.obs_steps * sum(OBS.values()), 256), torch.nn.Mish(),
            torch.nn.Linear(256, 256), torch.nn.Mish(), torch.nn.Linear(256, 256), torch.nn.Mish(),
            torch.nn.Linear(256, args.horizon * 7))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = ds[rng.integers(0, len(ds), args.batch)]

        def train_step():
            x = torch.cat([batch["obs"][k].flatten(1) for k in OBS], dim=1)
            loss = torch.nn.functional.mse_loss(model(x), batch["action"].flatten(1))
            opt.zero_grad()
            loss.backward()
            opt.step()

        def batch_path():
            ds[rng.integers(0, len(ds), args.batch)]

        loader = DataLoader(ds, batch_size=args.batch, shuffle=True)
        it = iter(loader)

        def item_path():
            nonlocal it
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)

        step_s = _time(train_step, args.repeats)
        batch_s = _time(batch_path, args.repeats)
        item_s = _time(item_path, max(3, args.repeats // 5))
        step_s = (step_s + _time(train_step, args.repeats)) / 2  # bracket the loads: the machine is noisy

    print(f"store: {args.episodes} episodes x {args.length} steps; append {append_s * 1e3:.1f} ms/episode; "
          f"dataset build (copy into memory) {build_s * 1e3:.0f} ms; {len(ds)} windows")
    print(f"batch {args.batch}, To={args.obs_steps}, Tp={args.horizon}, 1 thread")
    print(f"  training step (MLP 256x3, AdamW)      {step_s * 1e3:8.2f} ms")
    print(f"  dataset[indices] (batch path)         {batch_s * 1e3:8.2f} ms   = {batch_s / step_s:.3f} x step")
    print(f"  DataLoader per item + collate         {item_s * 1e3:8.2f} ms   = {item_s / step_s:.3f} x step")
    if args.image_size:
        print(f"  dataset[indices], frames from disk    {disk_s * 1e3:8.2f} ms   = {disk_s / step_s:.3f} x step")
        print(f"  (with {args.obs_steps} frames of {args.image_size}x{args.image_size}x3 per window; "
              "the step is the low-dim MLP's, an image encoder's step is far longer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def main_lerobot(argv: list[str] | None = None) -> int:
    """`dopr bench lerobot`: frames/s of `dopr data import-lerobot` against raw PyAV decoding of the same mp4s."""
    p = argparse.ArgumentParser(prog="dopr bench lerobot", description=main_lerobot.__doc__ + (
        " A store of smooth camera frames (a moving square on gradients) and Lift-sized low-dim keys is "
        "exported with `export-lerobot` (several episodes per mp4), then imported; raw decoding is PyAV's "
        "frame loop with to_ndarray('rgb24') over the same files, frame threads on, as the importer sets them."))
    p.add_argument("--root", default=None, help="a LeRobot dataset folder to measure instead of the generated one")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--length", type=int, default=100, help="steps per episode")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--vcodec", default="libsvtav1", choices=["libsvtav1", "h264", "hevc"])
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    args = p.parse_args(argv)

    from dopr.data import EpisodeStore
    from dopr.data.lerobot_export import export_lerobot
    from dopr.data.lerobot_format import require
    from dopr.data.lerobot_import import LeRobotReader, import_lerobot

    av = require("av")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "lerobot"
        if not args.root:
            store = EpisodeStore.create(Path(tmp) / "src.zarr", attrs={"obs_keys": [*OBS, "agentview_image"],
                                                                        "control_freq": 20})
            n = args.image_size
            y, x = np.mgrid[0:n, 0:n] / n
            base = np.stack([60 + 120 * x, 60 + 120 * y, 90 + 30 * (x + y)], -1)
            for _ in range(args.episodes):
                ep = {k: rng.normal(size=(args.length, d)).astype(np.float32) for k, d in OBS.items()}
                ep["action"] = rng.normal(size=(args.length, 7)).astype(np.float32)
                frames = np.repeat(base[None], args.length, axis=0)
                for t in range(args.length):
                    c = (3 + 2 * t) % (n - n // 4)
                    frames[t, c:c + n // 4, c:c + n // 4] = 230
                ep["agentview_image"] = frames.astype(np.uint8)
                store.append_episode(ep)
            t0 = time.perf_counter()
            export_lerobot(store.path, root, vcodec=args.vcodec, progress=False)
            export_s = time.perf_counter() - t0
        videos = sorted((root / "videos").rglob("*.mp4"))
        if not videos:
            raise SystemExit(f"{root}: no videos/**/*.mp4 to decode")

        def raw_decode() -> int:
            count = 0
            for path in videos:
                with av.open(str(path)) as container:
                    stream = container.streams.video[0]
                    stream.thread_type = "AUTO"
                    for frame in container.decode(stream):
                        frame.to_ndarray(format="rgb24")
                        count += 1
            return count

        def best(fn):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        def read_episodes() -> None:
            reader = LeRobotReader(root)
            for _ in reader:
                pass
            reader.close()

        n_frames = raw_decode()
        raw_s = best(raw_decode)
        read_s = best(read_episodes)
        out = Path(tmp) / "imported.zarr"
        import_s = best(lambda: import_lerobot(root, out, overwrite=True, progress=False))
        imported = EpisodeStore.open(out)
    print(f"{len(videos)} mp4 file(s), {n_frames} frames" + (f" of {args.image_size}x{args.image_size} "
          f"({args.vcodec}); export {n_frames / export_s:.0f} frames/s" if not args.root else "") +
          f"; imported {imported.n_episodes} episodes, {imported.n_steps} steps; best of {args.repeats}")
    print(f"  raw PyAV decode (to rgb24)        {n_frames / raw_s:9.0f} frames/s")
    print(f"  import's reader (LeRobotReader)   {n_frames / read_s:9.0f} frames/s   = {raw_s / read_s:.2f} x raw "
          "(parquet rows, frames matched to rows by timestamp)")
    print(f"  dopr data import-lerobot          {n_frames / import_s:9.0f} frames/s   = {raw_s / import_s:.2f} x raw "
          "(the reader plus the zarr store's compressed, atomic appends)")
    return 0
