"""`dopr eval`: closed-loop evaluation of a checkpoint in the simulator, over worker processes."""

from __future__ import annotations

from dopr.eval.config import EvalConfig
from dopr.options import add_options, from_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint closed-loop: success rate, return, episode lengths, videos",
        description=(
            "Run a checkpoint closed-loop on the task recorded in its meta.json. Worker processes "
            "step the simulators; the policy runs once per control step on one batch of all running "
            "episodes and each worker executes Ta actions of the predicted chunk (receding horizon; with "
            "--temporal-ensemble, one blended action per control step). "
            "Episode i uses seed SEED_BASE+i, so the same checkpoint and seeds give the same results "
            "whatever --workers is. Writes <checkpoint>/eval/results.json (success rate with a 95% "
            "Wilson interval, protocol, versions) and episodes.jsonl (one line per episode, appended "
            "as episodes finish, so Ctrl-C keeps them). Run the same command again after an interruption and "
            "only the missing episodes run; a complete result of the same protocol is reused as it is. An "
            "existing result of another protocol (other horizon, seeds, init, ..., or more episodes) is not "
            "replaced: choose --out DIR, or --overwrite. A crashed or hung worker is restarted and its "
            "episode recorded as failed. --backend ray runs the simulators as Ray actors instead (on a new local "
            "Ray, or --address's cluster; the policy stays here), with the same results."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/NAME/ckpt-final")
    add_options(p, EvalConfig)
    p.add_argument("--horizon-mult", type=float, default=None,
                   help="horizon = this multiple of the longest demonstration in --demos "
                        "(of the task's typical expert episode without --demos), e.g. 2; not with --horizon")
    p.add_argument("--out", default=None, help="output folder (default <checkpoint>/eval)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing result of another protocol in the output folder (default: refuse)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA weights")
    p.add_argument("--compounding-error", action="store_true",
                   help="instead: run from the demonstrations' initial states (--demos) with the expert labelling "
                        "every state reached and write <checkpoint>/eval/compounding_error.json")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for the policy on CPU (default: cores minus workers, at least 1, so the "
                        "policy does not fight the simulators for cores)")
    p.set_defaults(func=main)


def main(args) -> int:
    import dataclasses
    import json
    import os
    import sys

    import torch

    from dopr.envs import task_spec
    from dopr.envs.rendering import RenderingUnavailable, require_offscreen_rendering
    from dopr.eval.compounding_error import measure_compounding_error, shown_part
    from dopr.eval.evaluator import CheckpointMismatch, demo_initial_states, evaluate_checkpoint, resolve_horizon
    from dopr.eval.runs import CheckpointMeta
    from dopr.policies import CheckpointError

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))
    try:
        if args.compounding_error and not args.demos:
            raise ValueError("--compounding-error needs --demos STORE.zarr (the start states and the task's expert)")
        cfg = from_args(EvalConfig, args)
        if cfg.videos and not args.compounding_error:
            require_offscreen_rendering("videos (--videos)")
        if args.horizon_mult is not None:
            task = CheckpointMeta.read(args.checkpoint).task
            if task is None:
                raise ValueError(f"{args.checkpoint}/meta.json records no task; use --horizon")
            lengths = demo_initial_states(args.demos, task)[1] if args.demos else None
            spec = task_spec(task)
            horizon = resolve_horizon(spec.horizon, cfg.horizon, args.horizon_mult, lengths, spec.demo_steps)
            cfg = dataclasses.replace(cfg, horizon=horizon)
        if args.compounding_error:
            curve = measure_compounding_error(args.checkpoint, args.demos, cfg, ema=not args.no_ema)
            shown = shown_part(curve)
            print(f"compounding error over {curve['episodes']} episodes from demonstration starts: median at step 0 "
                  f"{shown['center'][0]:.4f}, largest {max(shown['center']):.4f} up to step {shown['step'][-1]} "
                  f"(while at least {shown['min_running']} episodes run; success {curve['success_rate']:.3f}); "
                  f"written to {args.checkpoint}/eval/compounding_error.json")
            return 0
        result = evaluate_checkpoint(args.checkpoint, cfg, out_dir=args.out, ema=not args.no_ema,
                                     overwrite=args.overwrite)
    except KeyboardInterrupt as err:
        print(f"\ndopr eval: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except (CheckpointMismatch, CheckpointError, RenderingUnavailable, ValueError, KeyError,
            FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dopr eval: error: {message}", file=sys.stderr)
        return 2
    if not result.timing.get("episodes_run", 1):
        print(f"{result.out_dir}/results.json: complete with this protocol already, reused")
    print(result.describe())
    print(json.dumps(result.timing))
    videos = [e for e in result.episodes if "video" in e or "video_error" in e]
    for e in videos:
        print(f"episode {e['episode']}: video {e.get('video') or 'not written: ' + str(e.get('video_error'))}")
    print(f"results: {result.out_dir}/results.json, episodes: {result.out_dir}/episodes.jsonl")
    return 0
