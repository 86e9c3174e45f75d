"""The training loop: behavior cloning from an episode store, one process or several (torchrun).

The run folder (others read it):
    config.json              the TrainConfig, every default resolved
    metrics.jsonl            one JSON object per logged step: step, train_loss, lr, steps_per_s,
                             data_frac, and val_loss / val_action_mse / eval_* when computed then
    tb/                      TensorBoard
    wandb.json               with --wandb: the wandb run's id, which a resumed run logs into
    ckpt-0001000/ ckpt-final/  checkpoints (dopr.policies.checkpoint), written atomically

Determinism: the batch of step s is a function of (seed, s) alone (`StepBatches`), and the
checkpoint holds every state a step changes (`TrainingState`), so a resumed run reaches the same
weights as an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from dopr.atomic import write_json_atomic
from dopr.train.batches import StepBatches, to_device
from dopr.train.checkpointing import TrainingState, checkpoint_meta, rng_state
from dopr.train.config import TrainConfig, resolve_defaults
from dopr.train.metrics_log import MetricsLog, ThroughputWindow, logs_evaluation
from dopr.train.validation import validate


def train_step(model, state: TrainingState, batch: dict, cfg: TrainConfig, autocast):
    """One optimizer step on `batch`; returns the loss tensor. `model` is the policy, or its DDP wrapper."""
    import torch

    with autocast:
        loss = model(batch)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.policy.parameters(), cfg.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.ema.update()
    state.step += 1
    return loss


def build_training_state(cfg: TrainConfig, train_set, obs_shapes: dict, action_dim: int, device, rank: int,
                         distributed: bool):
    """Policy, EMA, optimizer and schedule of step 0, and the module the loss is called on (DDP or not)."""
    import torch

    from dopr.optim import build as build_optimizer
    from dopr.optim import warmup_cosine
    from dopr.policies import PolicyConfig, build_policy
    from dopr.policies.ema import EMA

    policy_cfg = PolicyConfig(
        kind=cfg.policy, obs_shapes=obs_shapes, action_dim=action_dim, n_obs_steps=cfg.n_obs_steps,
        horizon=cfg.horizon, n_action_steps=cfg.n_action_steps, down_dims=cfg.down_dims, sampler=cfg.sampler,
        num_inference_steps=cfg.num_inference_steps, mlp_hidden_dim=cfg.mlp_hidden_dim, mlp_layers=cfg.mlp_layers,
        mlp_layer_norm=cfg.mlp_layer_norm, norm_mode=cfg.norm_mode,
    )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    policy = build_policy(policy_cfg, train_set.normalizer_stats()).to(device)
    ema_policy = build_policy(policy_cfg).to(device)
    model = policy
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None)
    optim_kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim.endswith("muon"):
        # Muon's update scaled to AdamW's RMS (Liu et al. 2025, torch.optim.Muon's "match_rms_adamw"): one lr
        # then serves the Muon matrices and the AdamW rest, and lr grids are shared with AdamW.
        optim_kw["adjust_lr_fn"] = "match_rms_adamw"
    if cfg.optim.startswith("dopr"):
        optim_kw.update({k: v for k, v in (("damping", cfg.damping), ("damping_mode", cfg.damping_mode),
                                           ("stats", cfg.stats), ("precond_every", cfg.precond_every),
                                           ("conv", cfg.conv)) if v is not None})
    optimizer = build_optimizer(cfg.optim, model, **optim_kw)  # DoPr averages its statistics over DDP ranks
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # each rank draws its own noise and crops
    return TrainingState(policy, ema_policy, EMA(policy, ema_policy, cfg.ema_decay), optimizer, scheduler), model


def train(cfg: TrainConfig, evaluate: Callable[[Path], dict] | None = None) -> Path:
    """Train; returns the ckpt-final folder. With cfg.eval_every, `evaluate(checkpoint)` evaluates a checkpoint
    closed-loop and gives the eval_* entries of its metrics line: eval_success_rate, eval_episodes, and
    eval_videos when it wrote videos (dopr.eval.checkpoint_evaluation; training does not import evaluation).
    One process writes a run folder at a time: a second `dopr train` on it is refused (dopr.folder_lock)."""
    from dopr.folder_lock import FolderLock

    main_process = int(os.environ.get("RANK", "0")) == 0
    with FolderLock.acquire(cfg.out, "dopr train") if main_process else nullcontext():
        return _train(cfg, evaluate)


def _train(cfg: TrainConfig, evaluate: Callable[[Path], dict] | None) -> Path:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from dopr.data import EpisodeStore, SequenceDataset, check_finite
    from dopr.policies.checkpoint import checkpoint_name, is_complete_checkpoint

    if cfg.eval_every and evaluate is None:  # fail now, not after hours of training
        raise ValueError("--eval-every needs an evaluation function: train(cfg, evaluate=...)")

    # --- processes and devices ---
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    distributed, main_process = world > 1, rank == 0
    device = torch.device(cfg.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {world}")
    torch.set_num_threads(cfg.threads or max(1, min(8, (os.cpu_count() or 1) // world)))

    # --- data ---
    store = EpisodeStore.open(cfg.data, mode="r")
    cfg = resolve_defaults(cfg, store)
    # A NaN or inf in one value would make every weight NaN (AdamW) or stop DoPr at step 0: one line naming
    # the store, key, episode and step instead, whatever the optimizer. Train and validation episodes alike.
    check_finite(store, [*cfg.obs_keys, "action"])
    run_dir = Path(cfg.out)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and any(run_dir.glob("ckpt-*")):
            raise FileExistsError(f"{run_dir}: holds checkpoints already; pass --resume to continue or choose a "
                                  f"new --out")
    data_kw = dict(store=store, obs_keys=cfg.obs_keys, n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon,
                   n_action_steps=cfg.n_action_steps, val_ratio=cfg.val_ratio, seed=cfg.split_seed,
                   cache_images=cfg.cache_images)
    train_set = SequenceDataset(split="train", **data_kw)
    val_set = SequenceDataset(split="val", **data_kw) if main_process and cfg.val_ratio > 0 else None
    obs_shapes = {k: list(store.array(k).shape[1:]) for k in cfg.obs_keys}
    action_dim = int(store.array("action").shape[1])
    batches = StepBatches(len(train_set), cfg.batch_size, cfg.seed)

    # --- policy, EMA, optimizer, schedule; resumed from a checkpoint ---
    state, model = build_training_state(cfg, train_set, obs_shapes, action_dim, device, rank, distributed)
    meta = checkpoint_meta(cfg, store, train_set.val_episodes, obs_shapes, action_dim)
    if cfg.resume:
        state.resume(cfg, meta["dataset"]["fingerprint"], world, rank)
    if main_process:
        write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
        wandb = None
        if cfg.wandb:
            from dopr.train.wandb_log import WandbLog

            wandb = WandbLog(run_dir, dataclasses.asdict(cfg), cfg.wandb_project, cfg.wandb_name, cfg.wandb_group,
                             cfg.wandb_mode)
        log = MetricsLog(run_dir, state.step, wandb)
    if cfg.eval_every and cfg.resume and state.step and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
        # A kill during the resumed checkpoint's evaluation left it unfinished and unlogged: complete it
        # (the evaluation runs only its missing episodes; a complete one is reused as it is).
        if main_process and not logs_evaluation(log.kept, state.step):
            log.write({"step": state.step, **evaluate(run_dir / checkpoint_name(state.step))})
        if distributed:
            dist.barrier()

    def save(name: str) -> Path:
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if main_process:
            state.save(run_dir / name, cfg, meta, rngs)
        if distributed:
            dist.barrier()
        return run_dir / name

    def due(every: int) -> bool:  # every K steps (0: never), and at the end
        return bool(every and state.step % every == 0) or state.step == cfg.steps

    if cfg.resume and state.step == cfg.steps:
        # Killed after the last step's checkpoint: every step is done, but ckpt-final may be missing (killed before
        # it was written) or its evaluation unlogged (killed during it). Finish what the last step would have done:
        # write ckpt-final, evaluate it (only its missing episodes) and log it with the validation that came back
        # with the checkpoint.
        final = run_dir / "ckpt-final"
        if not is_complete_checkpoint(final):
            final = save("ckpt-final")
        logged = (logs_evaluation(log.kept, state.step) if cfg.eval_every
                  else any(r.get("step") == state.step for r in log.kept)) if main_process else True
        if not logged:
            val = state.last_val if state.last_val and state.last_val["step"] == state.step else {}
            record = {**val, "step": state.step}
            if cfg.eval_every:
                record.update(evaluate(final))
            log.write(record)
        if distributed:
            dist.barrier()

    # --- the loop ---
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not (main_process and cfg.progress), desc="train")
    window = ThroughputWindow()
    state.policy.train()
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        batch = to_device(train_set[batches(state.step)[rank::world]], device)
        data_s = time.perf_counter() - t0
        loss = train_step(model, state, batch, cfg, autocast)
        window.add(loss, data_s)
        done, record = state.step, {}

        if due(cfg.log_every):
            record = {"step": done, "lr": state.scheduler.get_last_lr()[0], **window.take()}
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", sps=f"{record['steps_per_s']:.1f}")
        if due(cfg.val_every) and main_process:
            val = validate(state.ema_policy, val_set, device)  # EMA weights: what evaluation runs
            if val is not None:
                state.last_val = {"step": done, "val_loss": val.loss, "val_action_mse": val.action_mse}
                record.update(step=done, val_loss=val.loss, val_action_mse=val.action_mse)
        ckpt = None
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or (cfg.eval_every and done % cfg.eval_every == 0):
            ckpt = save(checkpoint_name(done))
        if done == cfg.steps:
            ckpt = save("ckpt-final")
        if cfg.eval_every and due(cfg.eval_every):
            if main_process:
                record.update(step=done, **evaluate(ckpt))
            if distributed:
                dist.barrier()
        if due(cfg.val_every) or (cfg.eval_every and due(cfg.eval_every)):
            window.pause_ended()  # validation and evaluation time is not training throughput
        if record and main_process:
            log.write(record)
        bar.update(1)
    bar.close()
    if main_process:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return run_dir / "ckpt-final"
