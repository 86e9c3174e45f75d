"""What the server runs: a checkpoint folder (through dopr.policies) or an exported file (runtime only).

Both give an object with ``meta`` (see ``export.deploy_meta``) and ``model(obs) -> (B, Ta, A)``
float32 for numpy ``obs[key]`` (B, To, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dopr.deploy.runtime import ExportedModel


class CheckpointModel:
    """A checkpoint folder loaded with ``load_policy``; generative policies draw noise from a seeded generator."""

    def __init__(self, ckpt_dir: str | Path, ema: bool = True, seed: int = 0, num_inference_steps: int | None = None):
        import torch

        from dopr.deploy.export import deploy_meta
        from dopr.policies import load_checkpoint_meta, load_policy

        self._torch = torch
        self.policy = load_policy(ckpt_dir, ema=ema, device="cpu")
        if num_inference_steps is not None and not self.policy.config.is_mlp:
            self.policy.config.num_inference_steps = int(num_inference_steps)
        self.meta = deploy_meta(self.policy, load_checkpoint_meta(ckpt_dir))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs.items()}
            return self.policy.predict_action(batch, generator=self.generator).numpy()


def load_model(path: str | Path, ema: bool = True, seed: int = 0, num_threads: int | None = None,
               num_inference_steps: int | None = None):
    """A checkpoint folder -> CheckpointModel; a ``.pt``/``.onnx`` file -> ExportedModel."""
    path = Path(path)
    if path.is_dir():
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        return CheckpointModel(path, ema=ema, seed=seed, num_inference_steps=num_inference_steps)
    if path.is_file():
        if num_inference_steps is not None:
            raise ValueError(f"{path}: an exported file has its sampling steps fixed at export time")
        return ExportedModel(path, num_threads=num_threads, seed=seed)
    raise FileNotFoundError(f"no checkpoint folder or exported policy file at {path}")
