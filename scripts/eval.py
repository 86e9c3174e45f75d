"""`dopr eval`: closed-loop evaluation of a checkpoint in the simulator, over worker processes."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint closed-loop: success rate, return, episode lengths, videos",
        description=(
            "Run a checkpoint closed-loop on the task recorded in its meta.json. Worker processes "
            "step the simulators; the policy runs once per control step on one batch of all running "
            "episodes and each worker executes Ta actions of the predicted chunk (receding horizon). "
            "Episode i uses seed SEED_BASE+i, so the same checkpoint and seeds give the same results "
            "whatever --workers is. Writes <checkpoint>/eval/results.json (success rate with a 95% "
            "Wilson interval, protocol, versions) and episodes.jsonl (one line per episode, appended "
            "as episodes finish, so Ctrl-C keeps them). A crashed or hung worker is restarted and its "
            "episode recorded as failed."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/ckpt-final")
    p.add_argument("--episodes", type=positive_int, default=50, help="number of episodes (default 50)")
    p.add_argument("--workers", type=positive_int, default=1, help="simulator worker processes (default 1)")
    p.add_argument("--device", default="cpu", help="device the policy runs on: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--seed-base", type=int, default=100_000, help="episode i uses seed SEED_BASE+i (default 100000)")
    p.add_argument("--init", choices=("random", "demos"), default="random",
                   help="initial states: seeded random (default) or the demonstrations' first states (needs --demos)")
    p.add_argument("--demos", default=None, help="episode store (.zarr) for --init demos, --horizon-mult and --compounding-error")
    horizon = p.add_mutually_exclusive_group()
    horizon.add_argument("--horizon", type=int, default=None, help="episode length limit (default: the task's horizon)")
    horizon.add_argument("--horizon-mult", type=float, default=None,
                         help="horizon = this multiple of the longest demonstration in --demos "
                              "(of the task's typical expert episode without --demos), e.g. 2")
    p.add_argument("--n-action-steps", type=int, default=None,
                   help="actions executed per policy call, at most the policy's Ta (default Ta)")
    p.add_argument("--videos", type=int, default=0,
                   help="write mp4 videos of the first K episodes (default 0); needs offscreen rendering "
                        "(MUJOCO_GL=egl on a GPU machine, libosmesa6 on a CPU machine) and refuses at once without it")
    p.add_argument("--out", default=None, help="output folder (default <checkpoint>/eval)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA weights")
    p.add_argument("--episode-timeout", type=float, default=600.0,
                   help="seconds an episode may take before its worker counts as hung and is restarted (default 600)")
    p.add_argument("--compounding-error", action="store_true",
                   help="instead: run from the demonstrations' initial states (--demos) with the expert labelling "
                        "every state reached and write <checkpoint>/eval/compounding_error.json")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the policy on CPU (default: cores minus workers, at least 1, so the "
                        "policy does not fight the simulators for cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args) -> int:
    import json
    import sys

    from dopr.envs import task_spec
    from dopr.envs.rendering import RenderingUnavailable, require_offscreen_rendering
    from dopr.eval.compounding_error import measure_compounding_error, shown_part
    from dopr.eval.evaluator import CheckpointMismatch, checkpoint_task, demo_initial_states, evaluate_checkpoint, resolve_horizon
    from dopr.policies import CheckpointError, load_checkpoint_meta

    import os

    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))
    try:
        if args.init == "demos" and not args.demos:
            raise ValueError("--init demos needs --demos STORE.zarr")
        if args.compounding_error and not args.demos:
            raise ValueError("--compounding-error needs --demos STORE.zarr (the start states and the task's expert)")
        if args.videos and not args.compounding_error:
            require_offscreen_rendering("videos (--videos)")
        task = checkpoint_task(load_checkpoint_meta(args.checkpoint))
        horizon = args.horizon
        if args.horizon_mult is not None:
            if task is None:
                raise ValueError(f"{args.checkpoint}/meta.json records no task; use --horizon")
            lengths = demo_initial_states(args.demos, task)[1] if args.demos else None
            spec = task_spec(task)
            horizon = resolve_horizon(spec.horizon, None, args.horizon_mult, lengths, spec.demo_steps)
        common = dict(episodes=args.episodes, workers=args.workers, device=args.device, horizon=horizon,
                      seed_base=args.seed_base, n_action_steps=args.n_action_steps, ema=not args.no_ema,
                      episode_timeout_s=args.episode_timeout, progress=not args.quiet)
        if args.compounding_error:
            curve = measure_compounding_error(args.checkpoint, args.demos, **common)
            shown = shown_part(curve)
            print(f"compounding error over {curve['episodes']} episodes from demonstration starts: median at step 0 "
                  f"{shown['center'][0]:.4f}, largest {max(shown['center']):.4f} up to step {shown['step'][-1]} "
                  f"(while at least {shown['min_running']} episodes run; success {curve['success_rate']:.3f}); "
                  f"written to {args.checkpoint}/eval/compounding_error.json")
            return 0
        result = evaluate_checkpoint(args.checkpoint, init=args.init, demos=args.demos, videos=args.videos,
                                     out_dir=args.out, **common)
    except KeyboardInterrupt as err:
        print(f"\ndopr eval: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except (CheckpointMismatch, CheckpointError, RenderingUnavailable, ValueError, KeyError,
            FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dopr eval: error: {message}", file=sys.stderr)
        return 2
    print(result.describe())
    print(json.dumps(result.timing))
    videos = [e for e in result.episodes if "video" in e or "video_error" in e]
    for e in videos:
        print(f"episode {e['episode']}: video {e.get('video') or 'not written: ' + str(e.get('video_error'))}")
    print(f"results: {result.out_dir}/results.json, episodes: {result.out_dir}/episodes.jsonl")
    return 0
