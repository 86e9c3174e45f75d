"""Websocket policy server: observation dict in, action chunk out (msgpack + numpy, see protocol.py).

On connect the server sends its metadata (observation keys, per-step shapes and dtypes, action
size, To/Ta, control rate). Each request is an observation dict with ``obs[key]`` of shape
(To, *shape) — or (B, To, *shape) for a batch — in exactly the declared dtype; the reply holds the
chunk (Ta, A) or (B, Ta, A). A request that is not valid (undecodable bytes, a text frame, a
missing key, a wrong shape or dtype, non-finite values) gets ``{"type": "error"}`` naming what
was wrong, and the connection and the server go on serving. ``GET /healthz`` answers 200 "OK".

``protocol="openpi"`` speaks openpi's variant instead (single steps, history per connection,
``actions`` in the reply, text-frame errors; see openpi.py).
"""

from __future__ import annotations

import http
import logging
import threading
import time
from typing import Any, Callable

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

from dopr.deploy.protocol import PROTOCOL_VERSION, ProtocolError, packb, unpackb

log = logging.getLogger("dopr.deploy.server")

MAX_MESSAGE_BYTES = 64 * 2**20  # a batch of images fits; a runaway client does not take the memory


PROTOCOLS = ("native", "openpi")


def _health_check(connection: ServerConnection, request):
    """``GET /healthz`` -> 200 "OK" (what openpi's server answers); other paths go on to the websocket."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


class BadRequest(ValueError):
    """A request the policy cannot answer; the message goes back to the client."""


def validate_observation(obs: Any, meta: dict) -> tuple[dict[str, np.ndarray], bool]:
    """Check a request against the metadata; return (obs batched to (B, To, ...), was_batched)."""
    if not isinstance(obs, dict):
        raise BadRequest(f"request must be a map of observation arrays, got {type(obs).__name__}")
    n_obs = meta["n_obs_steps"]
    first, batched, batch_size, out = None, None, None, {}
    for key in meta["obs_keys"]:
        if key not in obs:
            raise BadRequest(f"missing observation key '{key}'; expected keys {meta['obs_keys']}")
        value = obs[key]
        if not isinstance(value, np.ndarray):
            raise BadRequest(f"observation '{key}' must be a numpy array, got {type(value).__name__}")
        dtype = np.dtype(meta["obs_dtypes"][key])
        if value.dtype != dtype:
            raise BadRequest(f"observation '{key}' has dtype {value.dtype}, expected {dtype}")
        step_shape = tuple(meta["obs_shapes"][key])
        if value.shape == (n_obs, *step_shape):
            is_batched = False
        elif value.ndim == len(step_shape) + 2 and value.shape[1:] == (n_obs, *step_shape):
            is_batched = True
        else:
            raise BadRequest(
                f"observation '{key}' has shape {value.shape}, expected {(n_obs, *step_shape)} "
                f"or (B, {', '.join(map(str, (n_obs, *step_shape)))})"
            )
        value = value if is_batched else value[None]
        if value.shape[0] == 0:
            raise BadRequest(f"observation '{key}' is an empty batch")
        if first is None:
            first, batched, batch_size = key, is_batched, value.shape[0]
        elif is_batched != batched:
            raise BadRequest(f"observation '{key}' is {'' if is_batched else 'not '}batched, "
                             f"'{first}' is {'' if batched else 'not '}batched")
        elif value.shape[0] != batch_size:
            raise BadRequest(f"observation '{key}' has batch size {value.shape[0]}, '{first}' has {batch_size}")
        if dtype.kind == "f" and not np.isfinite(value).all():
            raise BadRequest(f"observation '{key}' holds NaN or inf")
        out[key] = value
    return out, bool(batched)


class PolicyServer:
    """Serve ``model(obs) -> (B, Ta, A)`` with metadata ``meta`` over websockets.

    ``model`` is anything from ``dopr.deploy.load.load_model`` (a checkpoint folder or an exported
    file). Requests from all connections are answered one at a time (one lock around the model).
    """

    def __init__(self, model: Callable[[dict[str, np.ndarray]], np.ndarray], meta: dict,
                 host: str = "127.0.0.1", port: int = 8000, protocol: str = "native",
                 renames: dict[str, str] | None = None):
        from dopr.deploy.openpi import openpi_metadata

        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        if renames and protocol != "openpi":
            raise ValueError("key renames are part of the openpi protocol (protocol='openpi')")
        unknown = sorted(set((renames or {}).values()) - set(meta["obs_keys"]))
        if unknown:
            raise ValueError(f"renames name {unknown}, which are not observation keys of the policy {meta['obs_keys']}")
        self.model = model
        self.meta = dict(meta)
        self.protocol, self.renames = protocol, dict(renames or {})
        self.metadata_message = packb(openpi_metadata(self.meta, self.renames) if protocol == "openpi" else
                                      {"type": "metadata", "protocol": PROTOCOL_VERSION, **self.meta})
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # compression off: the payload is mostly float bytes, and deflate costs latency
        self._server: Server = serve(self._handle, host, port, compression=None, max_size=MAX_MESSAGE_BYTES,
                                     process_request=_health_check)

    @property
    def port(self) -> int:
        return self._server.socket.getsockname()[1]

    def answer(self, message: Any) -> bytes:
        """Turn one request message (bytes) into the reply bytes; never raises for a bad request."""
        start = time.perf_counter()
        try:
            obs, batched = validate_observation(unpackb(message), self.meta)
            action = np.asarray(self._infer(obs), dtype=np.float32)
            reply = {"type": "action", "action": action if batched else action[0],
                     "server_ms": 1e3 * (time.perf_counter() - start)}
        except (ProtocolError, BadRequest) as err:
            reply = {"type": "error", "error": str(err)}
        except Exception as err:  # the model failed on a request that passed validation: report, keep serving
            log.exception("policy failed on a request")
            reply = {"type": "error", "error": f"policy failed: {type(err).__name__}: {err}"}
        return packb(reply)

    def _infer(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            return self.model(obs)

    def _handle(self, connection: ServerConnection) -> None:
        from dopr.deploy.openpi import OpenpiSession

        # openpi: a new connection is a new episode (an empty history)
        session = OpenpiSession(self.meta, self.renames) if self.protocol == "openpi" else None
        try:
            connection.send(self.metadata_message)
            for message in connection:
                connection.send(self.answer(message) if session is None else session.answer(message, self._infer))
        except ConnectionClosed:
            pass

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def start(self) -> "PolicyServer":
        """Serve from a background thread (tests, benchmarks); stop with ``shutdown()``."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="dopr-policy-server", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
