"""What a training checkpoint holds beyond the weights, and resuming a run from one.

A checkpoint (dopr.policies.checkpoint) holds model, EMA, optimizer, scheduler and every RNG state of
every process, so a resumed run reaches the same weights as an uninterrupted one (bit-identical on CPU).
Its meta.json says what evaluation must match (task, observation schema, horizons, control rate) and
which dataset it was trained on (by fingerprint, so a moved dataset is still recognized).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dopr.train.config import RESUME_MAY_CHANGE, TrainConfig


def rng_state() -> dict:
    """Every RNG a training step may draw from, as tensors/ints/lists (torch.load(weights_only=True) safe)."""
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


def checkpoint_meta(cfg: TrainConfig, store, val_episodes, obs_shapes: dict, action_dim: int) -> dict:
    """meta.json without the step and validation numbers: the dataset, and what evaluation must match
    (task, observation schema, action size, horizons, control rate, versions)."""
    attrs = dict(store.attrs)
    versions = attrs.get("versions") or {}
    return {
        "dataset": {"path": str(Path(cfg.data).resolve()), "fingerprint": dataset_fingerprint(store),
                    "n_episodes": store.n_episodes, "val_episodes": list(map(int, val_episodes))},
        "policy_kind": cfg.policy,
        "optim": cfg.optim,
        "task": attrs.get("task"),
        "obs_keys": list(cfg.obs_keys),
        "obs_shapes": obs_shapes,
        "action_dim": action_dim,
        "n_obs_steps": cfg.n_obs_steps,
        "horizon": cfg.horizon,
        "n_action_steps": cfg.n_action_steps,
        "control_freq": attrs.get("control_freq"),
        "versions": {k: versions.get(k) for k in ("robosuite", "mujoco", "gymnasium", "dopr")},
    }


@dataclass
class TrainingState:
    """Everything a step changes: weights, EMA, optimizer, schedule, the step and the last validation."""

    policy: object
    ema_policy: object
    ema: object
    optimizer: object
    scheduler: object
    step: int = 0
    last_val: dict | None = None  # {"step", "val_loss", "val_action_mse"} of the latest validation

    def save(self, path: Path, cfg: TrainConfig, meta: dict, rngs: list[dict]) -> None:
        from dopr.policies import save_checkpoint

        val = self.last_val or {}
        train_state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict(), "rng": rngs,
                       "last_val": self.last_val}
        meta = {"step": self.step, "val_loss": val.get("val_loss"), "val_action_mse": val.get("val_action_mse"),
                "val_step": val.get("step"), **meta}
        save_checkpoint(path, self.policy, self.ema_policy, train_state, dataclasses.asdict(cfg), meta)

    def resume(self, cfg: TrainConfig, fingerprint: str, world: int, rank: int) -> None:
        """Load the checkpoint `cfg.resume` names, after checking it was written by this configuration
        on this dataset by as many processes."""
        from dopr.policies.checkpoint import (
            load_checkpoint_config,
            load_checkpoint_meta,
            load_train_state,
            load_weights,
        )

        ckpt = find_resume_checkpoint(cfg)
        check_resume_config(load_checkpoint_config(ckpt).get("train", {}), cfg, ckpt / "config.json")
        if load_checkpoint_meta(ckpt).get("dataset", {}).get("fingerprint") != fingerprint:
            raise ValueError(f"{ckpt / 'meta.json'}: trained on a different dataset than {cfg.data} "
                             f"(fingerprint differs)")
        load_weights(self.policy, ckpt / "model.safetensors")
        load_weights(self.ema_policy, ckpt / "ema.safetensors")
        state = load_train_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])
        if len(state["rng"]) != world:
            raise ValueError(f"{ckpt}: written by {len(state['rng'])} process(es); resume with the same number, "
                             f"not {world}")
        set_rng_state(state["rng"][rank])
        self.step, self.last_val = int(state["step"]), state.get("last_val")


def find_resume_checkpoint(cfg: TrainConfig) -> Path:
    from dopr.policies.checkpoint import is_complete_checkpoint, latest_checkpoint, load_checkpoint_meta

    if cfg.resume != "latest":
        return Path(cfg.resume)
    ckpt = latest_checkpoint(cfg.out)
    final = Path(cfg.out) / "ckpt-final"
    if is_complete_checkpoint(final) and (
        ckpt is None or load_checkpoint_meta(final)["step"] > load_checkpoint_meta(ckpt)["step"]
    ):
        ckpt = final  # ckpt-final is newer when --ckpt-every does not divide --steps
    if ckpt is None:
        raise FileNotFoundError(f"{cfg.out}: no complete checkpoint to resume from")
    return ckpt


def check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    # runs written before the compared configuration had one name called it "label"
    saved = {("configuration" if k == "label" else k): v for k, v in saved.items()}
    # an option added since the checkpoint was written (norm_mode) ran at its default then
    saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in saved
                and f.default is not dataclasses.MISSING}, **saved}
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path}: cannot resume with a different configuration ({lines})")
