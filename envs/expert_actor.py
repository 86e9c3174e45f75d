"""An RL-trained expert as dopr uses it: the actor's weights in safetensors plus a JSON config.

    expert = ExpertActor.load("out/experts/humanoid")     # no pickle, no stable-baselines3 needed
    action = expert.act_vector(obs_vector)                 # deterministic action, in the env's units

The folder holds `actor.safetensors` (tensors `layers.<i>.weight` / `layers.<i>.bias`, the hidden
layers then the mean head) and `expert.json`:

    {"format": "dopr-expert-actor/1", "env_id": "Humanoid-v5", "obs_dim": 348, "action_dim": 17,
     "activation": "relu", "squash": "tanh", "action_low": [...], "action_high": [...],
     "trainer": "stable-baselines3 SAC", "env_steps": 1000000, "eval_return_mean": 5210.3, ...}

The deterministic action of a SAC actor is the squashed mean: a = tanh(mu(h(obs))), rescaled from
[-1, 1] to [action_low, action_high]. The trainer's own archives (optimizer state, replay buffer)
stay with the trainer (dopr.envs.sac_trainer); this file is all that collection needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dopr.atomic import write_json_atomic

FORMAT = "dopr-expert-actor/1"
ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh}


class ExpertActor:
    """A feed-forward actor: hidden layers with `activation`, a linear mean head, tanh squashing."""

    def __init__(self, weights: list[tuple[np.ndarray, np.ndarray]], config: dict):
        self.config = dict(config)
        self.weights = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in weights]
        self.activation = ACTIVATIONS[config["activation"]]
        self.low = np.asarray(config["action_low"], np.float64)
        self.high = np.asarray(config["action_high"], np.float64)
        self.obs_dim = int(config["obs_dim"])
        self.action_dim = int(config["action_dim"])

    @classmethod
    def load(cls, folder: str | Path) -> "ExpertActor":
        """Read `folder`/expert.json and `folder`/actor.safetensors; never unpickles anything."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        cfg_path, weights_path = folder / "expert.json", folder / "actor.safetensors"
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found; an expert folder holds expert.json and "
                                        "actor.safetensors (train one with `dopr expert train`)")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
        if config.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: key 'format' is {config.get('format')!r}, expected {FORMAT!r}")
        missing = [k for k in ("env_id", "obs_dim", "action_dim", "activation", "action_low", "action_high")
                   if k not in config]
        if missing:
            raise ValueError(f"{cfg_path}: missing keys {missing}")
        if config["activation"] not in ACTIVATIONS:
            raise ValueError(f"{cfg_path}: key 'activation' is {config['activation']!r}; "
                             f"known: {sorted(ACTIVATIONS)}")
        tensors = load_file(str(weights_path))
        n = len(tensors) // 2
        try:
            weights = [(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"]) for i in range(n)]
        except KeyError as err:
            raise ValueError(f"{weights_path}: missing tensor {err.args[0]!r}") from None
        if n == 0 or weights[0][0].shape[1] != config["obs_dim"] or weights[-1][0].shape[0] != config["action_dim"]:
            raise ValueError(f"{weights_path}: layer shapes {[w.shape for w, _ in weights]} do not map "
                             f"obs_dim {config['obs_dim']} to action_dim {config['action_dim']}")
        return cls(weights, config)

    def save(self, folder: str | Path) -> None:
        """Write expert.json and actor.safetensors into `folder` (each file replaced atomically)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (w, b) in enumerate(self.weights):
            tensors[f"layers.{i}.weight"] = np.ascontiguousarray(w, np.float32)
            tensors[f"layers.{i}.bias"] = np.ascontiguousarray(b, np.float32)
        tmp = folder / "actor.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(folder / "actor.safetensors")
        write_json_atomic(folder / "expert.json", dict(self.config, format=FORMAT))  # strict JSON: NaN as null

    def act_vector(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic action for one observation vector (or a batch of them)."""
        h = np.asarray(obs, np.float64)
        if h.shape[-1] != self.obs_dim:
            raise ValueError(f"observation has {h.shape[-1]} entries, the expert expects {self.obs_dim}")
        for w, b in self.weights[:-1]:
            h = self.activation(h @ w.T + b)
        w, b = self.weights[-1]
        squashed = np.tanh(h @ w.T + b)
        return self.low + 0.5 * (squashed + 1.0) * (self.high - self.low)

