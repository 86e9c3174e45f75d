"""Controller-side runtime: run an exported policy one control tick at a time.

This module needs numpy plus torch (TorchScript files) or onnxruntime (ONNX files), nothing of
dopr's training stack, so it can be copied next to a robot's controller together with an
exported file and dopr/temporal_ensemble.py (the ensembling it shares with `dopr eval`).

    runner = PolicyRunner.from_file("out/lift_mlp.onnx")
    obs = env.reset(seed=0)[0]; runner.reset()
    while ...:
        obs, *_ = env.step(runner.act(obs))

Timing: the runner keeps the last ``n_obs_steps`` observations (the first one is repeated after a
reset, as the training windows were padded). Without ensembling it predicts a chunk of
``n_action_steps`` actions when its queue is empty and hands them out one per tick (receding
horizon). With ``ensemble_decay=m`` it predicts a chunk every tick and executes, for tick t, the
average of every prediction made for t by the chunks still covering it, weighted
``exp(-m * i)`` with i = 0 for the oldest (ACT's temporal ensembling).
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from dopr.temporal_ensemble import TemporalEnsembler

# name of the metadata entry inside an exported file (a TorchScript extra file, an ONNX metadata prop)
META_KEY = "dopr_meta.json"
NOISE_INPUT = "noise"


class ExportedModel:
    """An exported policy file (``.pt`` TorchScript or ``.onnx``) with the metadata stored in it.

    ``model(obs, noise=None)`` takes ``obs[key]`` of shape (B, To, *shape) in the declared dtype and
    returns actions (B, Ta, A) as float32. Generative policies take their sampling noise as an
    input of shape (B, *meta["noise_shape"]); when it is not given it is drawn from ``rng``.
    """

    def __init__(self, path: str | Path, num_threads: int | None = None, seed: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported policy file not found: {self.path}")
        self.rng = np.random.default_rng(seed)
        if self.path.suffix == ".onnx":
            self._load_onnx(num_threads)
        else:
            self._load_torchscript(num_threads)
        self.obs_keys: list[str] = list(self.meta["obs_keys"])
        self.noise_shape = self.meta.get("noise_shape")

    def _load_onnx(self, num_threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{self.path}: not a loadable ONNX file ({type(err).__name__}: {err})") from None
        props = self._session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise ValueError(f"{self.path}: ONNX file has no '{META_KEY}' metadata; export it with `dopr export`")
        self.meta = json.loads(props[META_KEY])
        self._run = self._run_onnx

    def _load_torchscript(self, num_threads):
        import torch

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        extra = {META_KEY: ""}
        try:
            self._module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
        except RuntimeError as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{self.path}: not a TorchScript file from `dopr export` ({first_line})") from None
        self._module.eval()
        if not extra[META_KEY]:
            raise ValueError(f"{self.path}: TorchScript file has no '{META_KEY}'; export it with `dopr export`")
        self.meta = json.loads(extra[META_KEY])
        self._run = self._run_torchscript

    def _inputs(self, obs: dict[str, np.ndarray], noise: np.ndarray | None) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(obs[k]) for k in self.obs_keys]
        if self.noise_shape is not None:
            if noise is None:
                batch = arrays[0].shape[0]
                noise = self.rng.standard_normal((batch, *self.noise_shape)).astype(np.float32)
            arrays.append(np.ascontiguousarray(noise, dtype=np.float32))
        return arrays

    def _run_onnx(self, arrays):
        names = self.obs_keys + ([NOISE_INPUT] if self.noise_shape is not None else [])
        return self._session.run(None, dict(zip(names, arrays)))[0]

    def _run_torchscript(self, arrays):
        import torch

        with torch.inference_mode():
            return self._module(*[torch.from_numpy(a) for a in arrays]).numpy()

    def __call__(self, obs: dict[str, np.ndarray], noise: np.ndarray | None = None) -> np.ndarray:
        return self._run(self._inputs(obs, noise))


class PolicyRunner:
    """Observation history, action queue and optional ensembling around a chunk predictor.

    ``predict_chunk(obs)`` takes ``obs[key]`` of shape (To, *shape) and returns (Ta, A). Build one from
    an exported file (``from_file``) or from a remote policy server (``from_client``).
    """

    def __init__(
        self,
        predict_chunk: Callable[[dict[str, np.ndarray]], np.ndarray],
        obs_keys: list[str],
        n_obs_steps: int,
        obs_dtypes: dict[str, str] | None = None,
        ensemble_decay: float | None = None,
        meta: dict | None = None,
    ):
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.predict_chunk = predict_chunk
        self.obs_keys = list(obs_keys)
        self.n_obs_steps = int(n_obs_steps)
        self.obs_dtypes = {k: np.dtype(d) for k, d in (obs_dtypes or {}).items()}
        self.ensembler = TemporalEnsembler(ensemble_decay) if ensemble_decay is not None else None
        self.n_predictions = 0  # chunk predictions since construction, for timing checks
        self.meta = meta or {}  # the exported file's or the server's metadata (control_freq, task, ...)
        self.on_reset: Callable[[], None] | None = None  # e.g. tell a remote policy that an episode starts
        self.reset()

    @classmethod
    def from_file(cls, path: str | Path, ensemble_decay: float | None = None, seed: int = 0,
                  num_threads: int | None = None) -> "PolicyRunner":
        model = ExportedModel(path, num_threads=num_threads, seed=seed)

        def predict_chunk(obs):
            return model({k: v[None] for k, v in obs.items()})[0]

        meta = model.meta
        return cls(predict_chunk, meta["obs_keys"], meta["n_obs_steps"], meta.get("obs_dtypes"), ensemble_decay, meta)

    @classmethod
    def from_client(cls, client, ensemble_decay: float | None = None) -> "PolicyRunner":
        """Drive a remote policy through a ``PolicyClient`` (its metadata gives keys and To).

        The runner keeps the history and sends all To steps, to an openpi server too (which takes a
        (To, ...) value as the whole history), so both protocols see the same observations."""
        meta = client.metadata
        runner = cls(client.infer, meta["obs_keys"], meta["n_obs_steps"], meta.get("obs_dtypes"), ensemble_decay, meta)
        runner.on_reset = client.reset if hasattr(client, "reset") else None
        return runner

    def reset(self) -> None:
        """Forget the episode: history, queued actions, ensembled chunks."""
        self._history: deque[dict[str, np.ndarray]] = deque(maxlen=self.n_obs_steps)
        self._queue: deque[np.ndarray] = deque()
        if self.ensembler is not None:
            self.ensembler.reset()
        if self.on_reset is not None:
            self.on_reset()

    def _observe(self, obs: dict[str, np.ndarray]) -> None:
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation lacks key(s) {missing}; the policy needs {self.obs_keys}")
        step = {}
        for k in self.obs_keys:
            a = np.asarray(obs[k])
            step[k] = a.astype(self.obs_dtypes[k], copy=False) if k in self.obs_dtypes else a
        if not self._history:
            self._history.extend([step] * self.n_obs_steps)  # pad the start like the training windows
        else:
            self._history.append(step)

    def _predict(self) -> np.ndarray:
        stacked = {k: np.stack([s[k] for s in self._history]) for k in self.obs_keys}
        self.n_predictions += 1
        return np.asarray(self.predict_chunk(stacked))

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Record this tick's observation and return the action (A,) to execute now."""
        self._observe(obs)
        if self.ensembler is not None:
            return self.ensembler.update(self._predict())
        if not self._queue:
            self._queue.extend(self._predict())
        return self._queue.popleft()
