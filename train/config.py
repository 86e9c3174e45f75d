"""`TrainConfig`: every training option, declared once with its help text (the command line is generated from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dopr.options import LazyChoices, option

POLICY_KINDS = LazyChoices("dopr.policies.config", "POLICY_KINDS")  # one list, in policies/
OPTIMIZERS = LazyChoices("dopr.optim.names", "OPTIMIZERS")  # one list, in optim/ (torch-free)
STAT_MODES = LazyChoices("dopr.optim.names", "STAT_MODES")
DAMPING_MODES = LazyChoices("dopr.optim.names", "DAMPING_MODES")
CONV_FORMS = LazyChoices("dopr.optim.names", "CONV_FORMS")
MLP_KINDS = LazyChoices("dopr.policies.config", "MLP_KINDS")  # the policies that are one forward pass
NORM_MODES = LazyChoices("dopr.policies.config", "NORM_MODES")
# Fields that may differ between a run and its resumption (they do not change the weights).
# A moved run folder or dataset is fine: the dataset is checked by its fingerprint instead of its path.
RESUME_MAY_CHANGE = {"resume", "out", "data", "configuration", "threads", "eval_every", "eval_episodes",
                     "eval_workers", "eval_horizon", "eval_videos", "log_every", "progress", "wandb", "wandb_project",
                     "wandb_name", "wandb_group", "wandb_mode"}


@dataclass
class TrainConfig:
    data: str = option(help="episode store (zarr folder) written by `dopr collect` or `dopr data`")
    out: str = option("", "run folder (default out/runs/<policy>-<optim>-seed<seed>)")
    policy: str = option("mlp", "policy kind: %(choices)s (default %(default)s)", choices=POLICY_KINDS)
    optim: str = option("dopr-adamw", "optimizer: %(choices)s (default %(default)s)", choices=OPTIMIZERS)
    configuration: str | None = option(
        None, "this configuration's name in reports and tables (default: the optimizer)",
        flags=("--configuration", "--label"))
    steps: int = option(10000, "optimizer steps (default %(default)s)")
    seed: int = option(0, "seed of init, batches and noise (default %(default)s)")
    lr: float | None = option(None, "peak learning rate (default 3e-4 mlp/resmlp, 1e-4 diffusion/flow)")
    batch_size: int = option(256, "global batch size, split across DDP ranks (default %(default)s)")
    weight_decay: float = option(1e-4, "decoupled weight decay (default %(default)s)")
    damping: float | None = option(None, "DoPr damping gamma (dopr-* only; default: dopr.optim's)")
    damping_mode: str | None = option(
        None, "DoPr damping delta = gamma tr(Sigma) (trace, the paper's form) or gamma tr(Sigma)/d (mean_eig, "
              "the same meaning at every width) (dopr-* only; default: dopr.optim's)", choices=DAMPING_MODES)
    stats: str | None = option(
        None, "DoPr input statistics: batch (one batch's, refreshed every --precond-every steps), ema (an EMA over "
              "steps) or same-batch (every step's own batch, the paper's pairing) (dopr-* only; default: "
              "dopr.optim's)", choices=STAT_MODES)
    conv: str | None = option(
        None, "DoPr on convolutions: channel (the invariance principle's channel covariance) or patch (K-FAC's "
              "unfolded patches) (dopr-* only; default: dopr.optim's)", choices=CONV_FORMS)
    precond_every: int | None = option(
        None, "DoPr refreshes its factorization every K steps (dopr-* only; default: dopr.optim's)")
    warmup_steps: int | None = option(None, "linear warmup steps before the cosine (default min(500, steps/10))")
    min_lr_ratio: float = option(0.0, "the cosine's final lr as a fraction of the peak (default %(default)s)")
    grad_clip: float = option(1.0, "max global gradient norm, 0 = off (default %(default)s)")
    ema_decay: float = option(0.999, "EMA decay of the weights (default %(default)s)")
    val_ratio: float = option(0.1, "fraction of episodes held out (default %(default)s)")
    # the episode split does not follow --seed, so seeds compare on one validation set
    split_seed: int = option(0, "seed of the train/validation episode split (default %(default)s)")
    val_every: int = option(500, "validate every K steps, 0 = only at the end (default %(default)s)")
    ckpt_every: int = option(1000, "checkpoint every K steps, 0 = only the final one (default %(default)s)")
    log_every: int = option(50, "metrics line every K steps (default %(default)s)")
    eval_every: int = option(0, "closed-loop evaluation of a checkpoint every K steps, 0 = off (default %(default)s)")
    eval_episodes: int = option(50, "episodes per evaluation (default %(default)s)")
    eval_workers: int = option(1, "evaluation worker processes (default %(default)s)")
    eval_horizon: int | None = option(None, "evaluation episode length in control steps (default: the task's)")
    eval_videos: int = option(0, "mp4 videos of the first K episodes of every evaluation, logged with --wandb "
                                 "(default %(default)s; needs offscreen rendering, as dopr eval --videos)")
    obs_keys: list[str] | None = option(None, "comma-separated observation keys (default: the store's "
                                              "attrs['obs_keys'])")
    n_obs_steps: int | None = option(None, "To (default: the task's, 2 for manipulation, 1 for locomotion)",
                                     flags=("--n-obs-steps", "--To"))
    horizon: int | None = option(None, "Tp, predicted chunk (default: the task's, 16 for manipulation, 1 for "
                                       "locomotion)", flags=("--horizon", "--Tp"))
    n_action_steps: int | None = option(None, "Ta, executed chunk (default: the task's, 8 for manipulation, 1 for "
                                              "locomotion)", flags=("--n-action-steps", "--Ta"))
    mlp_hidden_dim: int = option(256, "mlp/resmlp width (default %(default)s)")
    mlp_layers: int = option(3, "mlp hidden layers, or resmlp residual blocks (default %(default)s)")
    mlp_layer_norm: bool = option(True, "resmlp without LayerNorm (default: in every residual block and "
                                        "before the head)")
    norm_mode: str = option("limits", "how observations and actions are normalized: limits (to [-1, 1], "
                                      "diffusion_policy's) or gaussian (zero mean, unit std) (default %(default)s)",
                            choices=NORM_MODES)
    down_dims: list[int] = option(help="UNet channel widths (default %(default)s)",
                                  default_factory=lambda: [256, 512, 1024])
    sampler: str = option("ddpm", "diffusion sampler (default %(default)s)", choices=("ddpm", "ddim"))
    num_inference_steps: int | None = option(None, "sampling steps (default 100 diffusion, 10 flow)",
                                             flags=("--inference-steps",))
    device: str = option("cpu", "cpu, cuda or cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)")
    bf16: bool = option(False, "bfloat16 autocast for the training forward pass")
    threads: int = option(0, "torch threads per process, 0 = cores / processes, at most 8 (default %(default)s)")
    # reading image frames from disk is ~26x slower than from memory
    cache_images: bool | None = option(None, "keep image arrays in memory (default: when they fit in 4 GiB)")
    resume: str | None = option(
        None, "continue from the latest checkpoint in --out, or from the checkpoint folder given",
        nargs="?", const="latest")
    progress: bool = option(True, "no tqdm bar")
    wandb: bool = option(False, "also log the metrics (and evaluation videos) to Weights & Biases; the optional "
                                'extra pip install -e ".[wandb]"; WANDB_* environment variables apply')
    wandb_project: str | None = option(None, "wandb project (default: $WANDB_PROJECT, else dopr)")
    wandb_name: str | None = option(None, "wandb run name (default: the run folder's name)")
    wandb_group: str | None = option(None, "wandb group (default: none; dopr experiment: its folder's name)")
    wandb_mode: str | None = option(None, "wandb mode (default: $WANDB_MODE, else online)",
                                    choices=("online", "offline", "disabled"))


def resolve_defaults(cfg: TrainConfig, store) -> TrainConfig:
    """Fill every None default, so config.json says exactly what ran."""
    from dopr.policies.config import PolicyConfig

    if cfg.policy not in POLICY_KINDS:
        raise ValueError(f"--policy must be one of {tuple(POLICY_KINDS)}, got {cfg.policy!r}")
    if cfg.optim not in OPTIMIZERS:
        raise ValueError(f"--optim must be one of {tuple(OPTIMIZERS)}, got {cfg.optim!r}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    c = dataclasses.replace(cfg)
    c.out = c.out or f"out/runs/{c.policy}-{c.optim}-seed{c.seed}"
    c.lr = c.lr if c.lr is not None else (3e-4 if c.policy in MLP_KINDS else 1e-4)
    c.configuration = c.configuration or c.optim
    c.warmup_steps = c.warmup_steps if c.warmup_steps is not None else min(500, c.steps // 10)
    c.num_inference_steps = c.num_inference_steps or (100 if c.policy == "diffusion" else 10)
    attrs = dict(store.attrs)
    # To, Tp, Ta: what the store's task asks for (its TaskSpec, which `dopr collect` records), else the policies'
    chunks = ((attrs.get("env_meta") or {}).get("spec") or {}).get("policy_chunks") or (
        PolicyConfig.n_obs_steps, PolicyConfig.horizon, PolicyConfig.n_action_steps)
    c.n_obs_steps, c.horizon, c.n_action_steps = (int(given if given is not None else default) for given, default
                                                  in zip((c.n_obs_steps, c.horizon, c.n_action_steps), chunks))
    if c.obs_keys is None:
        if "obs_keys" not in attrs:
            raise ValueError(f"{store.path}: attrs has no 'obs_keys'; pass --obs-keys (store keys: {store.keys})")
        c.obs_keys = list(attrs["obs_keys"])
    missing = [k for k in c.obs_keys if k not in store.keys]
    if missing:
        raise KeyError(f"{store.path}: observation key(s) {missing} not in the store (keys: {store.keys})")
    return c
