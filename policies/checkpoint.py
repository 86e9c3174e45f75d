"""Checkpoint folders: written atomically, loaded without executing code from any file.

    ckpt-0001000/
      config.json        {"policy_kind", "policy": PolicyConfig, "train": TrainConfig}
      model.safetensors  policy state dict (normalizer statistics included)
      ema.safetensors    EMA of the weights (what evaluation loads by default)
      optimizer.pt       optimizer, scheduler, EMA and RNG state (torch.load(weights_only=True))
      meta.json          step, val loss, dataset fingerprint, evaluation protocol
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dopr.atomic import default_file_mode, write_json_atomic
from dopr.policies.config import PolicyConfig
from dopr.policies.mlp_policy import MLPPolicy
from dopr.policies.policy import Policy
from dopr.policies.unet_policy import UnetPolicy

CHECKPOINT_FILES = ("config.json", "model.safetensors", "ema.safetensors", "optimizer.pt", "meta.json")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, truncated or does not match the policy it describes."""


def build_policy(config: PolicyConfig, stats: dict | None = None) -> Policy:
    if config.is_mlp:
        return MLPPolicy(config, stats)
    return UnetPolicy(config, stats)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def _state_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    ckpt_dir,
    policy: Policy,
    ema_policy: Policy | None = None,
    train_state: dict | None = None,
    train_config: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """Write a complete checkpoint folder to a temporary name and rename it into place.

    An existing folder of the same name (ckpt-final after a resume) is replaced: it is moved
    aside first, so at every moment either the old or the new complete checkpoint exists.
    """
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # key order matters in config.json: obs_shapes order is the feature order (json keeps it)
    write_json_atomic(
        tmp / "config.json",
        {"format_version": FORMAT_VERSION, "policy_kind": policy.config.kind, "policy": policy.config.to_dict(),
         "train": train_config or {}},
    )
    save_file(_state_for_safetensors(policy), str(tmp / "model.safetensors"))
    save_file(_state_for_safetensors(ema_policy if ema_policy is not None else policy), str(tmp / "ema.safetensors"))
    torch.save(train_state or {}, tmp / "optimizer.pt")
    write_json_atomic(tmp / "meta.json", {"format_version": FORMAT_VERSION, **(meta or {})})
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(f, default_file_mode())  # safetensors writes 0600: a controller account could not load it
    old = None
    if ckpt_dir.exists():
        old = ckpt_dir.parent / f".{ckpt_dir.name}.old-{os.getpid()}"
        os.rename(ckpt_dir, old)
    os.rename(tmp, ckpt_dir)
    if old is not None:
        shutil.rmtree(old)
    return ckpt_dir


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (is {path.parent} a complete dopr checkpoint folder?)")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def load_checkpoint_meta(ckpt_dir) -> dict:
    """meta.json of a checkpoint: step, val_loss, val_action_mse, dataset fingerprint, evaluation protocol."""
    return _read_json(Path(ckpt_dir) / "meta.json")


def load_checkpoint_config(ckpt_dir) -> dict:
    """config.json of a checkpoint, with "policy" turned into a PolicyConfig."""
    path = Path(ckpt_dir) / "config.json"
    cfg = _read_json(path)
    if "policy" not in cfg:
        raise CheckpointError(f"{path}: no 'policy' section")
    try:
        cfg["policy"] = PolicyConfig.from_dict(cfg["policy"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid policy config ({err})") from None
    return cfg


def _check_policy_kind(ckpt_dir: Path, cfg: dict) -> None:
    """config.json's policy kind must be the one meta.json and config.json's own `policy_kind` record: a kind
    edited in one place would otherwise be built and evaluated silently (flow weights run as diffusion)."""
    kind = cfg["policy"].kind
    recorded = {"config.json policy_kind": cfg.get("policy_kind")}
    if (ckpt_dir / "meta.json").is_file():
        recorded["meta.json policy_kind"] = load_checkpoint_meta(ckpt_dir).get("policy_kind")
    disagree = {where: k for where, k in recorded.items() if k is not None and k != kind}
    if disagree:
        said = ", ".join(f"{where} says {k!r}" for where, k in disagree.items())
        raise CheckpointError(f"{ckpt_dir}: config.json's policy.kind is {kind!r} but {said}; the files disagree "
                              f"about what these weights are (was one of {ckpt_dir / 'config.json'} or "
                              f"{ckpt_dir / 'meta.json'} edited?)")


def load_safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def load_policy(ckpt_dir, ema: bool = True, device="cpu") -> Policy:
    """Rebuild the policy from config.json and load ema.safetensors (or model.safetensors); eval mode."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint folder")
    cfg = load_checkpoint_config(ckpt_dir)
    policy = build_policy(cfg["policy"])
    weights = ckpt_dir / ("ema.safetensors" if ema else "model.safetensors")
    load_weights(policy, weights)
    _check_policy_kind(ckpt_dir, cfg)
    return policy.to(device).eval()


def load_weights(module: torch.nn.Module, path) -> None:
    state = load_safetensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for k in wrong[:5]:
            details.append(f"{k}: file has {tuple(state[k].shape)}, config.json implies {tuple(expected[k].shape)}")
        raise CheckpointError(f"{path}: weights do not match the policy in config.json: " + "; ".join(details))
    module.load_state_dict(state)


def load_train_state(ckpt_dir) -> dict:
    """optimizer.pt: optimizer, scheduler, EMA and RNG state, loaded with weights_only=True."""
    path = Path(ckpt_dir) / "optimizer.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt/unsafe pickles
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True "
                              f"({type(err).__name__}: {err})") from None


def is_complete_checkpoint(path) -> bool:
    """Every file of a checkpoint is there (an interrupted save leaves a folder without some)."""
    return Path(path).is_dir() and all((Path(path) / f).is_file() for f in CHECKPOINT_FILES)


def latest_checkpoint(run_dir) -> Path | None:
    """The complete ckpt-<step> folder with the highest step in a run folder (temporary folders are skipped)."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob("ckpt-*"):
        stem = p.name[len("ckpt-") :]
        if stem.isdigit() and is_complete_checkpoint(p):
            found.append((int(stem), p))
    return max(found)[1] if found else None
