"""`dopr train`: behavior cloning from an episode store, one process or several (torchrun).

    dopr train --data out/demos/lift.zarr --policy flow --optim dopr-adamw --steps 20000 --out out/runs/lift-flow
    torchrun --nproc_per_node=2 -m dopr.scripts.train --data ... --out ...

The run folder (others read it):
    config.json              the TrainConfig, every default resolved
    metrics.jsonl            one JSON object per logged step: step, train_loss, lr, steps_per_s,
                             data_frac, and val_loss / val_action_mse / eval_* when computed then
    tb/                      TensorBoard
    ckpt-0001000/ ckpt-final/  checkpoints (dopr.policies.checkpoint), written atomically

Determinism: the batch of step s is a function of (seed, s) alone (`StepBatches`), and the
checkpoint holds model, EMA, optimizer, scheduler and every RNG state, so a resumed run reaches
the same weights as an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dopr.data.atomic import read_jsonl, write_json_atomic, write_text_atomic

POLICIES = ("mlp", "diffusion", "flow")
from dopr.optim.names import OPTIMIZERS, STAT_MODES  # noqa: E402 (torch-free: `dopr --help` stays fast)
VAL_BATCH_SIZE = 256  # fixed, so the fixed validation noise does not depend on the training batch size
# Fields that may differ between a run and its resumption (they do not change the weights).
# A moved run folder or dataset is fine: the dataset is checked by its fingerprint instead of its path.
RESUME_MAY_CHANGE = {"resume", "out", "data", "label", "threads", "eval_every", "eval_episodes", "eval_workers", "eval_horizon", "log_every",
                     "progress"}


@dataclass
class TrainConfig:
    data: str
    out: str = ""  # default: out/runs/<policy>-<optim>-seed<seed>
    policy: str = "mlp"
    optim: str = "dopr-adamw"
    label: str | None = None  # this configuration's name in reports and tables (default: optim)
    steps: int = 10000
    seed: int = 0
    lr: float | None = None  # default: 3e-4 for mlp, 1e-4 for diffusion/flow
    batch_size: int = 256  # global: split across DDP ranks
    weight_decay: float = 1e-4
    damping: float | None = None  # DoPr's gamma (default: optim's)
    stats: str | None = None  # DoPr's statistics: "batch" or "ema" (default: optim's)
    precond_every: int | None = None  # DoPr's factorization refresh period in steps (default: optim's)
    warmup_steps: int | None = None  # default: min(500, steps // 10)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    val_ratio: float = 0.1
    split_seed: int = 0  # the episode split does not follow --seed, so seeds compare on one validation set
    val_every: int = 500
    ckpt_every: int = 1000
    log_every: int = 50
    eval_every: int = 0  # 0: no closed-loop evaluation during training
    eval_episodes: int = 50
    eval_workers: int = 1
    eval_horizon: int | None = None  # None: the task's horizon
    obs_keys: list[str] | None = None  # default: the store's attrs["obs_keys"]
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    sampler: str = "ddpm"
    num_inference_steps: int | None = None  # default: 100 for diffusion (DDPM), 10 for flow
    device: str = "cpu"
    bf16: bool = False
    threads: int = 0  # torch threads per process; 0: cores / processes, at most 8
    cache_images: bool | None = None  # None: keep images in memory when they fit (reading frames from disk is ~26x slower)
    resume: str | None = None  # "latest" or a checkpoint folder
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(data="")
    p.add_argument("--data", required=True, help="episode store (zarr folder) written by `dopr collect` or `dopr data`")
    p.add_argument("--out", default="", help="run folder (default out/runs/<policy>-<optim>-seed<seed>)")
    p.add_argument("--policy", choices=POLICIES, default=d.policy, help="policy kind (default %(default)s)")
    p.add_argument("--optim", choices=OPTIMIZERS, default=d.optim, help="optimizer (default %(default)s)")
    p.add_argument("--label", default=None, help="this configuration's name in reports (default: the optimizer)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of init, batches and noise (default %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4 mlp, 1e-4 diffusion/flow)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay (default %(default)s)")
    p.add_argument("--damping", type=float, default=None, help="DoPr damping gamma (dopr-* only; default: dopr.optim's)")
    p.add_argument("--stats", choices=STAT_MODES, default=None,
                   help="DoPr input statistics: this batch's, or an EMA over steps (dopr-* only; default: dopr.optim's)")
    p.add_argument("--precond-every", type=int, default=None,
                   help="DoPr refreshes its factorization every K steps (dopr-* only; default: dopr.optim's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps before the cosine (default min(500, steps/10))")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm, 0 = off (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay of the weights (default %(default)s)")
    p.add_argument("--val-ratio", type=float, default=d.val_ratio, help="fraction of episodes held out (default %(default)s)")
    p.add_argument("--val-every", type=int, default=d.val_every, help="validate every K steps, 0 = only at the end (default %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint every K steps, 0 = only the final one (default %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="metrics line every K steps (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=0, help="closed-loop evaluation of a checkpoint every K steps (needs dopr.eval; 0 = off)")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes, help="episodes per evaluation (default %(default)s)")
    p.add_argument("--eval-workers", type=int, default=d.eval_workers, help="evaluation worker processes (default %(default)s)")
    p.add_argument("--eval-horizon", type=int, default=None, help="evaluation episode length in control steps (default: the task's)")
    p.add_argument("--obs-keys", default=None, help="comma-separated observation keys (default: the store's attrs['obs_keys'])")
    p.add_argument("--n-obs-steps", "--To", dest="n_obs_steps", type=int, default=d.n_obs_steps, help="To (default %(default)s)")
    p.add_argument("--horizon", "--Tp", dest="horizon", type=int, default=d.horizon, help="Tp, predicted chunk (default %(default)s)")
    p.add_argument("--n-action-steps", "--Ta", dest="n_action_steps", type=int, default=d.n_action_steps, help="Ta, executed chunk (default %(default)s)")
    p.add_argument("--down-dims", default="256,512,1024", help="UNet channel widths (default %(default)s)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=d.sampler, help="diffusion sampler (default %(default)s)")
    p.add_argument("--inference-steps", dest="num_inference_steps", type=int, default=None, help="sampling steps (default 100 diffusion, 10 flow)")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the training forward pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: cores / processes, at most 8)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help="keep image arrays in memory (default: when they fit in 4 GiB)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in --out, or from the checkpoint folder given")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy (mlp, diffusion, flow) on an episode store",
        description="Behavior cloning from an episode store. Writes config.json, metrics.jsonl, tb/ and "
        "checkpoints ckpt-<step>/ and ckpt-final/ into --out. Several processes: "
        "`torchrun --nproc_per_node=N -m dopr.scripts.train ...`.",
    )
    add_arguments(p)
    p.set_defaults(func=main)


def config_from_args(args) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if isinstance(values.get("obs_keys"), str):
        values["obs_keys"] = [k for k in values["obs_keys"].split(",") if k]
    if isinstance(values.get("down_dims"), str):
        values["down_dims"] = [int(x) for x in values["down_dims"].split(",") if x]
    return TrainConfig(**values)


def resolve_defaults(cfg: TrainConfig, store) -> TrainConfig:
    """Fill every None default, so config.json says exactly what ran."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"--policy must be one of {POLICIES}, got {cfg.policy!r}")
    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"--optim must be one of {OPTIMIZERS}, got {cfg.optim!r}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    c = dataclasses.replace(cfg)
    c.out = c.out or f"out/runs/{c.policy}-{c.optim}-seed{c.seed}"
    c.lr = c.lr if c.lr is not None else (3e-4 if c.policy == "mlp" else 1e-4)
    c.label = c.label or c.optim
    c.warmup_steps = c.warmup_steps if c.warmup_steps is not None else min(500, c.steps // 10)
    c.num_inference_steps = c.num_inference_steps or (100 if c.policy == "diffusion" else 10)
    if c.obs_keys is None:
        attrs = dict(store.attrs)
        if "obs_keys" not in attrs:
            raise ValueError(f"{store.path}: attrs has no 'obs_keys'; pass --obs-keys (store keys: {store.keys})")
        c.obs_keys = list(attrs["obs_keys"])
    missing = [k for k in c.obs_keys if k not in store.keys]
    if missing:
        raise KeyError(f"{store.path}: observation key(s) {missing} not in the store (keys: {store.keys})")
    return c


# ---------------------------------------------------------------------------------------------
# pieces the loop uses
class StepBatches:
    """The window indices of global batch `step`: epoch-wise permutations seeded by (seed, epoch).

    Sample position p = step * batch_size + j lies in epoch p // n at place p % n of that epoch's
    permutation. Every window is seen once per epoch, and no iterator state needs saving: a resumed
    run asks for step s and gets exactly the batch the uninterrupted run had.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise ValueError("the training split has no windows")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        pos = step * self.batch_size + np.arange(self.batch_size)
        epochs, places = pos // self.n, pos % self.n
        return np.concatenate([self._perm(int(e))[places[epochs == e]] for e in np.unique(epochs)])


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def rng_state() -> dict:
    """Every RNG a training step may draw from, as tensors/ints/lists (torch.load(weights_only=True) safe)."""
    import random

    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def dataset_fingerprint(store, action_key: str = "action") -> str:
    """sha256 of the episode boundaries, every key's shape and dtype, and the action array."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.asarray(store.episode_ends, dtype=np.int64).tobytes())
    for key in sorted(store.keys):
        arr = store.array(key)
        h.update(f"{key}:{tuple(arr.shape)}:{arr.dtype}".encode())
    h.update(np.ascontiguousarray(np.asarray(store.array(action_key)[: store.n_steps])).tobytes())
    return h.hexdigest()


def evaluation_protocol(store, cfg: TrainConfig, obs_shapes: dict, action_dim: int) -> dict:
    """What evaluation must match: task, observation schema, action size, horizons, control rate, versions."""
    attrs = dict(store.attrs)
    versions = attrs.get("versions") or {}
    return {
        "task": attrs.get("task"),
        "obs_keys": list(cfg.obs_keys),
        "obs_shapes": obs_shapes,
        "action_dim": action_dim,
        "n_obs_steps": cfg.n_obs_steps,
        "horizon": cfg.horizon,
        "n_action_steps": cfg.n_action_steps,
        "control_freq": attrs.get("control_freq"),
        "env_meta": attrs.get("env_meta"),
        "versions": {k: versions.get(k) for k in ("robosuite", "mujoco", "gymnasium", "dopr")},
    }


@dataclass
class ValResult:
    loss: float
    action_mse: float


def validate(policy, dataset, device) -> ValResult | None:
    """One-step loss and sampled-chunk MSE over the whole validation split, with noise, timesteps
    and sampling seeded by the batch index so numbers compare across checkpoints and runs."""
    import torch

    if dataset is None or len(dataset) == 0:
        return None
    was_training = policy.training
    policy.eval()
    loss_sum, mse_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i, start in enumerate(range(0, len(dataset), VAL_BATCH_SIZE)):
            idx = np.arange(start, min(start + VAL_BATCH_SIZE, len(dataset)))
            batch = to_device(dataset[idx], device)
            g = torch.Generator(device=device).manual_seed(i)
            loss = policy.compute_loss(batch, generator=g)
            chunk = policy.sample_chunk(batch["obs"], generator=torch.Generator(device=device).manual_seed(1_000_000 + i))
            loss_sum += loss.item() * len(idx)
            mse_sum += (chunk - batch["action"]).pow(2).mean().item() * len(idx)
            count += len(idx)
    policy.train(was_training)
    return ValResult(loss_sum / count, mse_sum / count)


class MetricsLog:
    """metrics.jsonl (flushed per line) and TensorBoard. On resume, lines after the resumed step
    (and a line cut by a kill) are dropped, so the file reads as one run."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [rec for rec in read_jsonl(self.path) if rec.get("step", 0) <= start_step]
        write_text_atomic(self.path, "".join(json.dumps(rec) + "\n" for rec in kept))
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def find_resume_checkpoint(cfg: TrainConfig) -> Path:
    from dopr.policies.checkpoint import CHECKPOINT_FILES, latest_checkpoint, load_checkpoint_meta

    if cfg.resume == "latest":
        ckpt = latest_checkpoint(cfg.out)
        final = Path(cfg.out) / "ckpt-final"
        if all((final / f).is_file() for f in CHECKPOINT_FILES) and (
            ckpt is None or load_checkpoint_meta(final)["step"] > load_checkpoint_meta(ckpt)["step"]
        ):
            ckpt = final  # ckpt-final is newer when --ckpt-every does not divide --steps
        if ckpt is None:
            raise FileNotFoundError(f"{cfg.out}: no complete checkpoint to resume from")
        return ckpt
    return Path(cfg.resume)


def check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path}: cannot resume with a different configuration ({lines})")


# ---------------------------------------------------------------------------------------------
# the run
def train(cfg: TrainConfig) -> Path:
    """Train; returns the ckpt-final folder."""
    import time
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from dopr.data import EpisodeStore, SequenceDataset
    from dopr.optim import build as build_optimizer
    from dopr.optim import warmup_cosine
    from dopr.policies import PolicyConfig, build_policy, save_checkpoint
    from dopr.policies.checkpoint import (
        checkpoint_name,
        load_checkpoint_config,
        load_checkpoint_meta,
        load_train_state,
        load_weights,
    )
    from dopr.policies.ema import EMA

    # --- processes and devices ---
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1
    device = torch.device(cfg.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes {world}")
    torch.set_num_threads(cfg.threads or max(1, min(8, (os.cpu_count() or 1) // world)))
    main_process = rank == 0

    # --- data ---
    store = EpisodeStore.open(cfg.data, mode="r")
    cfg = resolve_defaults(cfg, store)
    run_dir = Path(cfg.out)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and any(run_dir.glob("ckpt-*")):
            raise FileExistsError(f"{run_dir}: holds checkpoints already; pass --resume to continue or choose a new --out")
    data_kw = dict(store=store, obs_keys=cfg.obs_keys, n_obs_steps=cfg.n_obs_steps, horizon=cfg.horizon,
                   n_action_steps=cfg.n_action_steps, val_ratio=cfg.val_ratio, seed=cfg.split_seed,
                   cache_images=cfg.cache_images)
    train_set = SequenceDataset(split="train", **data_kw)
    val_set = SequenceDataset(split="val", **data_kw) if main_process and cfg.val_ratio > 0 else None
    obs_shapes = {k: list(store.array(k).shape[1:]) for k in cfg.obs_keys}
    action_dim = int(store.array("action").shape[1])
    batches = StepBatches(len(train_set), cfg.batch_size, cfg.seed)

    # --- policy, EMA, optimizer, schedule ---
    policy_cfg = PolicyConfig(
        kind=cfg.policy, obs_shapes=obs_shapes, action_dim=action_dim, n_obs_steps=cfg.n_obs_steps,
        horizon=cfg.horizon, n_action_steps=cfg.n_action_steps, down_dims=cfg.down_dims, sampler=cfg.sampler,
        num_inference_steps=cfg.num_inference_steps,
    )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    policy = build_policy(policy_cfg, train_set.normalizer_stats()).to(device)
    ema_policy = build_policy(policy_cfg).to(device)
    ema = EMA(policy, ema_policy, cfg.ema_decay)
    model = policy
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    optim_kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optim.endswith("muon"):
        # Muon's update scaled to AdamW's RMS (Liu et al. 2025, torch.optim.Muon's "match_rms_adamw"): one lr
        # then serves the Muon matrices and the AdamW rest, and lr grids are shared with AdamW.
        optim_kw["adjust_lr_fn"] = "match_rms_adamw"
    if cfg.optim.startswith("dopr"):
        optim_kw.update({k: v for k, v in (("damping", cfg.damping), ("stats", cfg.stats),
                                           ("precond_every", cfg.precond_every)) if v is not None})
    optimizer = build_optimizer(cfg.optim, model, **optim_kw)  # DoPr averages its statistics over DDP ranks
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)  # each rank draws its own noise and crops

    # --- resume ---
    fingerprint = dataset_fingerprint(store)
    start_step, last_val = 0, None
    if cfg.resume:
        ckpt = find_resume_checkpoint(cfg)
        check_resume_config(load_checkpoint_config(ckpt).get("train", {}), cfg, ckpt / "config.json")
        saved_fingerprint = load_checkpoint_meta(ckpt).get("dataset", {}).get("fingerprint")
        if saved_fingerprint != fingerprint:
            raise ValueError(f"{ckpt / 'meta.json'}: trained on a different dataset than {cfg.data} (fingerprint differs)")
        load_weights(policy, ckpt / "model.safetensors")
        load_weights(ema_policy, ckpt / "ema.safetensors")
        state = load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        if len(state["rng"]) != world:
            raise ValueError(f"{ckpt}: written by {len(state['rng'])} process(es); resume with the same number, not {world}")
        set_rng_state(state["rng"][rank])
        start_step, last_val = int(state["step"]), state.get("last_val")
    if main_process:
        write_json_atomic(run_dir / "config.json", dataclasses.asdict(cfg))
        log = MetricsLog(run_dir, start_step)
    protocol = evaluation_protocol(store, cfg, obs_shapes, action_dim)
    evaluate_checkpoint = None
    if cfg.eval_every:
        from dopr.eval import evaluate_checkpoint  # fail now, not after hours of training

    def checkpoint(name: str, step: int) -> Path:
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        path = run_dir / name
        if main_process:
            train_state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "ema": ema.state_dict(), "rng": rngs, "last_val": last_val}
            meta = {"step": step, "val_loss": (last_val or {}).get("val_loss"),
                    "val_action_mse": (last_val or {}).get("val_action_mse"), "val_step": (last_val or {}).get("step"),
                    "dataset": {"path": str(Path(cfg.data).resolve()), "fingerprint": fingerprint,
                                "n_episodes": store.n_episodes, "val_episodes": train_set.val_episodes.tolist()},
                    "policy_kind": cfg.policy, "optim": cfg.optim, **protocol}
            save_checkpoint(path, policy, ema_policy, train_state, dataclasses.asdict(cfg), meta)
        if distributed:
            dist.barrier()
        return path

    # --- the loop ---
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (main_process and cfg.progress), desc="train")
    loss_sum, data_time, window_start, window_steps = 0.0, 0.0, time.perf_counter(), 0
    policy.train()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        batch = to_device(train_set[batches(step)[rank::world]], device)
        data_time += time.perf_counter() - t0

        with autocast:
            loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update()
        loss_sum += loss.detach().float()
        window_steps += 1
        done = step + 1
        last = done == cfg.steps

        record = {}
        if done % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "train_loss": float(loss_sum) / window_steps,
                      "lr": scheduler.get_last_lr()[0], "steps_per_s": window_steps / elapsed,
                      "data_frac": data_time / elapsed}
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", sps=f"{record['steps_per_s']:.1f}")
            loss_sum, data_time, window_start, window_steps = 0.0, 0.0, time.perf_counter(), 0
        if (cfg.val_every and done % cfg.val_every == 0) or last:
            if main_process:
                val = validate(ema_policy, val_set, device)  # EMA weights: what evaluation runs
                if val is not None:
                    last_val = {"step": done, "val_loss": val.loss, "val_action_mse": val.action_mse}
                    record.update(step=done, val_loss=val.loss, val_action_mse=val.action_mse)
            window_start = time.perf_counter()  # validation time is not training throughput
        ckpt_path = None
        if (cfg.ckpt_every and done % cfg.ckpt_every == 0) or (cfg.eval_every and done % cfg.eval_every == 0):
            ckpt_path = checkpoint(checkpoint_name(done), done)
        if last:
            ckpt_path = checkpoint("ckpt-final", done)
        if evaluate_checkpoint is not None and (done % cfg.eval_every == 0 or last):
            if main_process:
                result = evaluate_checkpoint(str(ckpt_path), episodes=cfg.eval_episodes, workers=cfg.eval_workers,
                                             horizon=cfg.eval_horizon, device=str(device), progress=False)
                record.update(step=done, eval_success_rate=float(result.success_rate), eval_episodes=cfg.eval_episodes)
            if distributed:
                dist.barrier()
            window_start = time.perf_counter()
        if record and main_process:
            log.write(record)
        bar.update(1)
    bar.close()
    if main_process:
        log.close()
    if distributed:
        dist.destroy_process_group()
    return run_dir / "ckpt-final"


def main(args) -> int:
    train(config_from_args(args))
    return 0


if __name__ == "__main__":  # torchrun -m dopr.scripts.train ...
    parser = argparse.ArgumentParser(prog="python -m dopr.scripts.train", description="dopr train (see `dopr train --help`)")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
