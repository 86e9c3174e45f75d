"""`dopr data info|import-robomimic|import-lerobot|export-lerobot|split|check-replay`: look into, import, export
and verify episode stores."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data",
        help="inspect, import and verify episode stores (zarr)",
        description="Tools for episode stores: zarr groups with data/<key> arrays concatenated over "
        "time and meta/episode_ends (diffusion_policy's layout; zarr v2 and v3 stores open).",
    )
    p.set_defaults(func=main)
    cmds = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    info = cmds.add_parser("info", help="episodes, steps, keys, shapes, dtypes, per-key statistics, attrs",
                           description="Print a store's episodes and steps, each key's per-step shape, dtype, "
                           "chunks and statistics (min/max/mean/std over all its values), and its attributes.")
    info.add_argument("path", help="the store (a .zarr folder)")
    info.add_argument("--full", action="store_true",
                      help="scan every float array for NaN/inf, image keys too (the statistics already read every "
                      "other key); exit status 1 if one is found")
    info.add_argument("--per-dim", action="store_true", help="print statistics per feature dimension")
    info.add_argument("--images", action="store_true", help="also compute statistics of image keys (slow)")
    info.set_defaults(action=main_info)

    _add_import(cmds, "import-robomimic", main_import, ("hdf5", "robomimic dataset file (.hdf5)"),
                help="convert a robomimic hdf5 dataset to an episode store",
                description="Convert robomimic's hdf5 (data/demo_N/{obs/*, actions, states, rewards, "
                "dones}) to a store: keys action, state, reward, done and every obs key; "
                "mask/train and mask/valid become the store's split.")
    lri = _add_import(cmds, "import-lerobot", main_import_lerobot,
                      ("root", "the LeRobot dataset folder (the one holding meta/info.json)"),
                      help="convert a local LeRobotDataset (v3.0 or v2.1) folder to a store",
                      description="Convert a LeRobotDataset folder (meta/info.json, data/chunk-*/file-*.parquet, "
                      "meta/episodes/..., videos/<key>/chunk-*/file-*.mp4; v2.1's per-episode files too) to a "
                      "store. Episode boundaries are kept exactly; camera frames (AV1, H.264, HEVC) are decoded "
                      "with PyAV and matched to rows by timestamp; observation.images.* become uint8 (T, H, W, 3) "
                      "arrays; numeric features keep their names and dtypes. Needs the extra: "
                      'pip install -e ".[lerobot]".')
    lri.add_argument("--tolerance-s", type=float, default=1e-4,
                     help="largest gap between a row's timestamp and its video frame (default 1e-4 s, lerobot's)")

    lre = cmds.add_parser("export-lerobot", help="write a store as a LeRobotDataset v3.0 folder",
                          description="Write the store as a LeRobotDataset v3.0 folder that lerobot's "
                          "LeRobotDataset(repo_id, root=ROOT) loads: parquet data and episode metadata, stats, tasks "
                          "and one video per camera key holding several episodes per mp4. Keys: the action -> action, "
                          "camera k -> observation.images.k, observation k -> observation.k, reward/done -> "
                          "next.reward/next.done. meta/dopr.json keeps the store's names and attrs, so "
                          "import-lerobot gives the store back. Needs the extra: pip install -e \".[lerobot]\".")
    lre.add_argument("store", help="the store (a .zarr folder)")
    lre.add_argument("root", help="the folder to write (must not exist unless --overwrite)")
    lre.add_argument("--fps", type=int, default=None, help="frame rate (default: the store's attrs['control_freq'])")
    lre.add_argument("--vcodec", default="libsvtav1", choices=["libsvtav1", "h264", "hevc"],
                     help="video codec (default libsvtav1: AV1, what lerobot writes)")
    lre.add_argument("--task", default=None,
                     help="language instruction of every episode (default: the store's attrs['task'])")
    lre.add_argument("--overwrite", action="store_true", help="replace ROOT if it exists")
    lre.set_defaults(action=main_export_lerobot)

    spl = cmds.add_parser("split", help="record a seeded episode-level train/val split in the store's attrs",
                          description="Draw a seeded train/validation split over the store's episodes and record "
                          "it in attrs['split'], where training takes it from (a split that came with the data, "
                          "e.g. robomimic's masks, is replaced only with --force).")
    spl.add_argument("path", help="the store (a .zarr folder)")
    spl.add_argument("--val-ratio", type=float, default=0.1, help="fraction of episodes for validation (default 0.1)")
    spl.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    spl.add_argument("--force", action="store_true", help="replace a split that came with the data")
    spl.set_defaults(action=main_split)

    rep = cmds.add_parser("check-replay", help="replay stored actions from stored states; compare success",
                          description="For each episode, reset the task's env to the episode's first stored "
                          "simulator state (data/state), step its stored actions, and check that the "
                          "episode's stored success is reproduced. Exit status 1 if any episode differs.")
    rep.add_argument("path", help="the store (a .zarr folder)")
    rep.add_argument("--episodes", type=int, default=None, help="check only the first N episodes (default: all)")
    rep.add_argument("--task", default=None, help="task name (default: the store's attrs['task'])")
    rep.set_defaults(action=main_check_replay)


def _add_import(cmds, name: str, action, source: tuple[str, str], **texts):
    """A `dopr data import-*` subcommand: SOURCE OUT [--overwrite]."""
    p = cmds.add_parser(name, **texts)
    p.add_argument(source[0], help=source[1])
    p.add_argument("out", help="the store to write (.zarr folder; must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(action=action)
    return p


def main(args) -> int:
    from dopr.scripts.errors import USER_ERRORS, user_error

    try:
        return args.action(args)
    except USER_ERRORS as err:  # EpisodeStoreError is a ValueError: a bad store or file
        return user_error("data", err)


def _fmt(x) -> str:
    return f"{x:.4g}"


def main_info(args) -> int:
    import numpy as np

    from dopr.data import EpisodeStore, EpisodeStoreError, check_finite, compute_stats
    from dopr.data.sequence_sampler import is_image_like

    store = EpisodeStore.open(args.path, mode="r")
    problem = None
    if args.full:
        try:
            store.validate(full=True)
        except EpisodeStoreError as err:
            problem = str(err)
    stats = {key: compute_stats(store, [key])[key] for key in store.keys
             if store.n_episodes and (args.images or not is_image_like(store.array(key)))}
    nonfinite = [key for key, s in stats.items() if not all(np.isfinite(v).all() for v in s.values())]
    if nonfinite and problem is None:  # min/max over every value are finite only if every value is
        try:
            check_finite(store, nonfinite)
        except EpisodeStoreError as err:
            problem = str(err)
    unscanned = [k for k in store.keys if k not in stats and np.dtype(store.array(k).dtype).kind == "f"]
    if problem:
        valid = f"NaN/inf found: {problem}"
    elif args.full or not unscanned:
        valid = "no NaN/inf (every float value read)"
    else:
        valid = f"layout checked; {', '.join(unscanned)} not scanned for NaN/inf (--full scans them)"
    lengths = store.episode_lengths
    print(f"store     {store.path}  (zarr v{store.zarr_format})")
    print(f"episodes  {store.n_episodes}")
    print(f"steps     {store.n_steps}" + (f"  (episode length min {lengths.min()}, mean {lengths.mean():.1f}, "
                                          f"max {lengths.max()})" if len(lengths) else ""))
    print(f"valid     {valid}")
    print()
    print(f"{'key':<28} {'shape':<14} {'dtype':<8} {'chunks':<16} {'min':>10} {'max':>10} {'mean':>10} {'std':>10}")
    for key in store.keys:
        arr = store.array(key)
        row = f"{key:<28} {str(tuple(arr.shape[1:])):<14} {str(arr.dtype):<8} {str(tuple(arr.chunks)):<16}"
        if key in nonfinite:
            print(row + "  (holds NaN/inf: no statistics)")
        elif key in stats:
            s = stats[key]
            # over all values of the key: the pooled std from the per-dimension moments
            mean = float(s["mean"].mean())
            std = float(np.sqrt((s["std"].astype(np.float64) ** 2 + (s["mean"] - mean) ** 2).mean()))
            row += f" {_fmt(s['min'].min()):>10} {_fmt(s['max'].max()):>10} {_fmt(mean):>10} {_fmt(std):>10}"
            print(row)
            if args.per_dim:
                for name in ("min", "max", "mean", "std"):
                    print(f"    {name:<5} {np.array2string(s[name].ravel(), precision=4, max_line_width=120)}")
        else:
            print(row + ("  (image: --images for statistics)" if store.n_episodes else ""))
    attrs = dict(store.attrs)
    print()
    split = attrs.pop("split", None)
    if split:
        print(f"split     train {len(split.get('train', []))} / val {len(split.get('val', []))} episodes "
              f"(source {split.get('source', 'seeded')}" +
              (f", seed {split['seed']}, val_ratio {split['val_ratio']})" if "seed" in split else ")"))
    else:
        print("split     none recorded (training computes a seeded one)")
    width = max([9, *map(len, attrs)])
    for key, value in attrs.items():
        text = json.dumps(value, default=str)
        print(f"{key:<{width}} {text if len(text) <= 200 else text[:197] + '...'}")
    return 1 if problem else 0


def main_import(args) -> int:
    from dopr.data import import_robomimic

    store = import_robomimic(args.hdf5, args.out, overwrite=args.overwrite)
    print(f"wrote {store.path}: {store.n_episodes} episodes, {store.n_steps} steps, keys {', '.join(store.keys)}")
    return 0


def main_import_lerobot(args) -> int:
    from dopr.data.lerobot_import import import_lerobot

    try:
        store = import_lerobot(args.root, args.out, overwrite=args.overwrite, tolerance_s=args.tolerance_s)
    except (ValueError, OSError) as err:  # EpisodeStoreError is a ValueError: it names the file and key
        raise SystemExit(f"dopr data import-lerobot: error: {err}") from None
    print(f"wrote {store.path}: {store.n_episodes} episodes, {store.n_steps} steps, keys {', '.join(store.keys)}")
    return 0


def main_export_lerobot(args) -> int:
    from dopr.data.lerobot_export import export_lerobot

    try:
        root = export_lerobot(args.store, args.root, fps=args.fps, vcodec=args.vcodec, task=args.task,
                              overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        raise SystemExit(f"dopr data export-lerobot: error: {err}") from None
    print(f"wrote {root}: LeRobotDataset v3.0 (load with lerobot's LeRobotDataset('local/{root.name}', root='{root}'))")
    return 0


def main_split(args) -> int:
    from dopr.data import EpisodeStore, record_split

    store = EpisodeStore.open(args.path, mode="a")
    old = dict(store.attrs).get("split")
    if old and old.get("source", "seeded") != "seeded" and not args.force:
        raise SystemExit(f"{store.path}: holds a {old['source']} split; pass --force to replace it")
    train, val = record_split(store, args.val_ratio, args.seed)
    print(f"{store.path}: split recorded: {len(train)} train / {len(val)} val episodes (seed {args.seed})")
    return 0


def main_check_replay(args) -> int:
    from dopr import envs
    from dopr.data import EpisodeStore
    from dopr.envs.replay import check_replay

    store = EpisodeStore.open(args.path, mode="r")
    attrs = dict(store.attrs)
    task = args.task or attrs.get("task")
    if not task:
        raise SystemExit(f"{store.path}: attrs has no 'task'; pass --task")
    meta = attrs.get("env_meta") or {}
    horizon = int(meta.get("horizon") or (store.episode_lengths.max() if store.n_episodes else 1))
    n = store.n_episodes if args.episodes is None else min(args.episodes, store.n_episodes)
    results = check_replay(store, lambda: envs.make(task, obs="lowdim", horizon=horizon), episodes=range(n))
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"episode {r.episode}: stored success {r.stored_success}, replay success {r.replay_success} "
              f"after {r.steps} steps (max state error {r.max_state_error:.3g})")
    errors = [r.max_state_error for r in results if r.max_state_error == r.max_state_error]
    drift = f"; max state error {max(errors):.3g}" if errors else ""
    print(f"{len(results) - len(bad)}/{len(results)} episodes reproduce their stored success{drift}")
    return 1 if bad else 0
