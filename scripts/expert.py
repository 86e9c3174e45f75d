"""`dopr expert train`: an RL expert (stable-baselines3 SAC) for the locomotion tasks, resumable."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "expert",
        help="train an RL expert for a locomotion task (humanoid, walker2d, ...)",
        description=(
            "Tasks without a scripted expert (humanoid, walker2d, hopper, ant) get one trained with "
            "stable-baselines3's SAC (optional extra: pip install -e \".[rl]\"). Training runs in chunks; "
            "after each it evaluates the deterministic actor, logs metrics.jsonl and returns.png, and "
            "checkpoints the replay buffer, optimizers and RNG states, so the same command resumes "
            "after a kill. OUT/actor.safetensors + OUT/expert.json (the best evaluation so far) is the "
            "expert that `dopr collect --expert OUT` uses; it loads without pickle."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="train or resume a SAC expert",
                           description="Train (or resume) a SAC expert; see `dopr expert --help`.")
    t.add_argument("--task", required=True, help="locomotion task: humanoid, walker2d, hopper or ant")
    t.add_argument("--steps", type=int, default=1_000_000, help="total environment steps (default 1M)")
    t.add_argument("--out", default=None, help="expert folder (default out/experts/TASK)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    t.add_argument("--chunk-steps", type=int, default=20_000,
                   help="environment steps between evaluation + checkpoint (default 20000): what a kill can lose")
    t.add_argument("--eval-episodes", type=int, default=5, help="deterministic episodes per evaluation (default 5)")
    t.add_argument("--learning-starts", type=int, default=10_000, help="random-action warm-up steps (default 10000)")
    t.add_argument("--gradient-steps", type=int, default=1, help="gradient steps per environment step (default 1)")
    t.add_argument("--buffer-size", type=int, default=1_000_000, help="replay buffer capacity (default 1M)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 2 was slower when measured)")
    t.add_argument("--stop-at-return", type=float, default=None, metavar="R",
                   help="stop at the first evaluation whose mean return is >= R with every episode reaching the "
                        "horizon (default: train all --steps); re-running with a goal already met trains nothing")
    t.set_defaults(func=main)


def main(args) -> int:
    import sys

    from dopr.envs.gym_env import LOCOMOTION_TASKS
    from dopr.envs.sac_trainer import SACConfig, train_sac_expert
    from dopr.folder_lock import FolderBusy

    if args.task not in LOCOMOTION_TASKS:
        print(f"dopr expert: error: --task {args.task!r} has no RL expert; choose from "
              f"{', '.join(LOCOMOTION_TASKS)}", file=sys.stderr)
        return 2
    cfg = SACConfig(env_id=LOCOMOTION_TASKS[args.task][0], steps=args.steps, seed=args.seed,
                    chunk_steps=args.chunk_steps, eval_episodes=args.eval_episodes,
                    learning_starts=args.learning_starts, gradient_steps=args.gradient_steps,
                    buffer_size=args.buffer_size, threads=args.threads, stop_at_return=args.stop_at_return)
    out = args.out or f"out/experts/{args.task}"
    try:
        row = train_sac_expert(cfg, out)
    except FolderBusy as err:
        print(f"dopr expert: error: {err}", file=sys.stderr)
        return 2
    if row:
        print(f"{out}: {row['env_steps']} env steps, last evaluation return {row['eval_return_mean']:.1f} "
              f"(sd {row['eval_return_sd']:.1f}); best actor in {out}/actor.safetensors")
    return 0
