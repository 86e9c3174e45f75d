"""openpi's serving protocol (`dopr serve --protocol openpi`), as openpi-client 0.1.2 speaks it.

What differs from dopr's native protocol (protocol.py, server.py):
- the first message is the metadata map itself, without ``"type": "metadata"``;
- a request is one control step per key, ``obs[key]`` of the per-step shape; the server keeps each
  connection's last To steps (the first step of an episode fills the whole history, as the training
  windows were padded). A (To, ...) value is taken as the whole history instead. Keys the policy does
  not use (openpi clients send a "prompt") are ignored;
- values are cast to the declared dtype when no information is lost (e.g. int64 -> float32 for
  small integers, integral floats -> uint8), and float64 -> float32 always, as openpi does;
  anything lossy is refused;
- the reply is ``{"actions": (Ta, A), "action": (Ta, A), "server_timing": {"infer_ms": ...}}``;
- an error is a text frame holding the traceback, which openpi's client raises; the connection stays
  open (openpi's own server closes it);
- episode control: ``{"endpoint": "reset"}`` forgets the history and is answered
  ``{"status": "reset successful"}``; a new connection starts a new episode too; ``{"endpoint":
  "infer", ...}`` is a request like any other;
- key renames map the client's names to the policy's (``observation/state`` -> ``robot0_eef_pos``).

With To > 1 the history holds only the steps a client sends: a client that asks for a chunk every
Ta ticks (openpi's ActionChunkBroker) should send every tick's observation or the (To, ...) history.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from dopr.deploy.protocol import ProtocolError, packb, unpackb
from dopr.deploy.server import BadRequest, validate_observation

log = logging.getLogger("dopr.deploy.openpi")

RESET_REPLY = {"status": "reset successful"}


def parse_renames(pairs: list[str]) -> dict[str, str]:
    """["client_key=policy_key", ...] -> {client_key: policy_key}."""
    renames = {}
    for pair in pairs:
        client_key, sep, policy_key = pair.partition("=")
        if not sep or not client_key or not policy_key:
            raise ValueError(f"rename {pair!r} is not CLIENT_KEY=POLICY_KEY")
        renames[client_key] = policy_key
    return renames


def openpi_metadata(meta: dict, renames: dict[str, str]) -> dict:
    """The metadata map sent on connect: the policy's, with observation keys as the client names them."""
    to_client = {policy_key: client_key for client_key, policy_key in renames.items()}

    def name(key: str) -> str:
        return to_client.get(key, key)

    return {**meta, "protocol": "openpi", "endpoints": ["infer", "reset"],
            "obs_keys": [name(k) for k in meta["obs_keys"]],
            "obs_shapes": {name(k): v for k, v in meta["obs_shapes"].items()},
            "obs_dtypes": {name(k): v for k, v in meta["obs_dtypes"].items()}}


def cast_losslessly(key: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """``value`` as ``dtype``; float -> float always (openpi's float64 -> float32), otherwise only when
    every value survives the round trip."""
    value = np.asarray(value)
    if value.dtype == dtype:
        return value
    if value.dtype.kind not in "biuf":
        raise BadRequest(f"observation '{key}' has dtype {value.dtype}, expected {dtype}")
    if value.dtype.kind == "f" and dtype.kind == "f":
        if np.isfinite(value).all() and np.abs(value).max(initial=0) > np.finfo(dtype).max:
            raise BadRequest(f"observation '{key}' holds values beyond the range of {dtype}")
        return value.astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        cast = value.astype(dtype)
        exact = np.array_equal(cast.astype(value.dtype), value)
    if not exact:
        raise BadRequest(f"observation '{key}' has dtype {value.dtype} with values that {dtype} cannot hold "
                         "exactly; send it as " + str(dtype))
    return cast


class OpenpiSession:
    """One connection's state: the observation history, reset by an episode-control message."""

    def __init__(self, meta: dict, renames: dict[str, str]):
        self.meta, self.renames = meta, renames
        self.n_obs_steps = int(meta["n_obs_steps"])
        self.reset()

    def reset(self) -> None:
        self.history: dict[str, deque] = {k: deque(maxlen=self.n_obs_steps) for k in self.meta["obs_keys"]}

    def _observation(self, request: dict) -> dict[str, np.ndarray]:
        """The request's steps appended to the history -> {key: (1, To, ...)} for the model."""
        request = {self.renames.get(k, k): v for k, v in request.items()}
        steps = {}
        for key in self.meta["obs_keys"]:
            client_key = next((c for c, p in self.renames.items() if p == key), key)  # errors name what was sent
            if key not in request:
                raise BadRequest(f"missing observation key '{client_key}'; expected keys "
                                 f"{openpi_metadata(self.meta, self.renames)['obs_keys']}")
            value = cast_losslessly(client_key, request[key], np.dtype(self.meta["obs_dtypes"][key]))
            step_shape = tuple(self.meta["obs_shapes"][key])
            if value.shape not in (step_shape, (self.n_obs_steps, *step_shape)):
                raise BadRequest(f"observation '{client_key}' has shape {value.shape}, expected one step "
                                 f"{step_shape} or the history {(self.n_obs_steps, *step_shape)}")
            steps[key] = value
        # the new history replaces the old only if the request passes every check (NaN included)
        history = {k: deque(h, maxlen=self.n_obs_steps) for k, h in self.history.items()}
        for key, value in steps.items():
            if value.shape == tuple(self.meta["obs_shapes"][key]):
                history[key].extend([value] * (self.n_obs_steps if not history[key] else 1))
            else:
                history[key].extend(value)
        obs, _ = validate_observation({k: np.stack(h) for k, h in history.items()}, self.meta)
        self.history = history
        return obs

    def answer(self, message: Any, model: Callable[[dict], np.ndarray]) -> bytes | str:
        """Reply bytes for a request, the reset reply, or a text frame with the traceback of an error."""
        start = time.perf_counter()
        try:
            request = unpackb(message)
            if not isinstance(request, dict):
                raise BadRequest(f"request must be a map of observations, got {type(request).__name__}")
            endpoint = request.pop("endpoint", "infer")
            if endpoint == "reset":
                self.reset()
                return packb(RESET_REPLY)
            if endpoint != "infer":
                raise BadRequest(f"unknown endpoint {endpoint!r}; this server answers 'infer' and 'reset'")
            obs = self._observation(request)
            infer_start = time.perf_counter()
            chunk = np.asarray(model(obs), dtype=np.float32)[0]
            now = time.perf_counter()
            return packb({"actions": chunk, "action": chunk, "server_ms": 1e3 * (now - start),
                          "server_timing": {"infer_ms": 1e3 * (now - infer_start)}})
        except (ProtocolError, BadRequest):  # openpi's way: the traceback as a text frame, which its client raises
            return traceback.format_exc()
        except Exception:  # the model failed on a request that passed the checks: log it too, keep serving
            log.exception("policy failed on a request")
            return traceback.format_exc()
