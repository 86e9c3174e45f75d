"""`dopr collect`: expert demonstrations into a zarr episode store, with parallel workers."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "collect",
        help="collect scripted-expert demonstrations into an episode store",
        description=(
            "Roll out a task's scripted expert in worker processes and append the episodes to a "
            "zarr episode store (the clean expert action as the label, every observation key, the "
            "simulator state and the reward at every step). Episode i uses seed SEED+i, so the "
            "store does not depend on --workers. Running the command again on an existing store "
            "appends until it holds --episodes episodes, continuing after the last seed used."
        ),
    )
    p.add_argument("--task", required=True, help="task name, e.g. lift, can, reacher (all listed below)")
    p.add_argument("--episodes", type=int, required=True, help="number of episodes the store should hold")
    p.add_argument("--out", required=True, help="store path, e.g. out/demos/lift.zarr (created if missing)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes (default 2; 0 runs in this process)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed of a new store (default 0); a resumed store keeps its own")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="std of Gaussian noise added to the executed action (the stored label stays clean)")
    p.add_argument("--keep-failed", action="store_true", help="also store episodes that did not succeed")
    p.add_argument("--obs", choices=("lowdim", "image"), default="lowdim",
                   help="observation keys to store: low-dimensional only, or with camera images")
    p.add_argument("--horizon", type=int, default=None, help="episode length limit (default: the task's)")
    p.add_argument("--image-size", type=int, default=84, help="camera image height and width (obs=image)")
    p.add_argument("--expert", default=None,
                   help="RL-expert folder for humanoid/walker2d/hopper/ant (default out/experts/TASK, "
                        "written by `dopr expert train`)")
    p.set_defaults(func=main)
    _list_tasks_in_help(p)


def _list_tasks_in_help(p) -> None:
    """Append the task registry to `dopr collect --help`. Listing it imports the simulators (about a second),
    so it is done when the help is printed, not whenever the `dopr` parser is built."""
    format_help = p.format_help

    def with_tasks() -> str:
        from dopr.envs import TASKS

        scripted = [name for name, spec in TASKS.items() if spec.extra.get("expert") != "rl"]
        trained = [name for name in TASKS if name not in scripted]
        p.epilog = (f"tasks with a scripted expert: {', '.join(scripted)}. "
                    f"Tasks without one (train one with `dopr expert train`): {', '.join(trained)}.")
        return format_help()

    p.format_help = with_tasks


def main(args) -> int:
    from dopr.envs.collect import CollectConfig, collect
    from dopr.scripts.errors import USER_ERRORS, user_error

    cfg = CollectConfig(
        task=args.task, n_episodes=args.episodes, out=args.out, workers=args.workers,
        seed=args.seed, noise_std=args.noise_std, keep_failed=args.keep_failed, obs=args.obs,
        horizon=args.horizon, image_size=args.image_size, expert=args.expert,
    )
    try:
        summary = collect(cfg)
    except (*USER_ERRORS, RuntimeError) as err:  # bad task, store or expert; failed workers
        return user_error("collect", err)
    if summary.attempts == 0:
        print(f"{summary.path}: already holds {summary.n_episodes} episodes; nothing to do")
        return 0
    rate = summary.env_steps / max(summary.seconds, 1e-9)
    print(
        f"{summary.path}: {summary.n_episodes} episodes (+{summary.added}); this run "
        f"{summary.successes}/{summary.attempts} successful rollouts, {summary.env_steps} env steps "
        f"in {summary.seconds:.1f} s ({rate:.0f} steps/s)"
    )
    return 0
