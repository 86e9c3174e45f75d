"""Synchronous client for the policy server; needs only numpy, msgpack and websockets.

    with PolicyClient("127.0.0.1", 8000) as client:
        print(client.metadata["obs_keys"], client.metadata["control_freq"])
        chunk = client.infer({"robot0_eef_pos": history, ...})   # (To, ...) per key -> (Ta, A)

Pair it with ``PolicyRunner.from_client(client)`` for history keeping and one action per tick.
"""

from __future__ import annotations

import numpy as np
from websockets.sync.client import connect

from dopr.deploy.protocol import packb, unpackb


class PolicyServerError(RuntimeError):
    """The server answered a request with an error message."""


class PolicyClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0):
        self.timeout = timeout
        self._ws = connect(f"ws://{host}:{port}", compression=None, max_size=None, open_timeout=timeout)
        self.metadata: dict = unpackb(self._ws.recv(timeout=timeout))
        if self.metadata.get("type") != "metadata":
            raise PolicyServerError(f"server at {host}:{port} did not start with metadata: {self.metadata!r}")
        self.last_server_ms: float | None = None

    def send_raw(self, payload: bytes | str) -> dict:
        """Send bytes as they are and return the decoded reply (for testing the server's checks)."""
        self._ws.send(payload)
        return unpackb(self._ws.recv(timeout=self.timeout))

    def infer(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Send ``obs[key]`` (To, ...) or (B, To, ...); return the action chunk (Ta, A) or (B, Ta, A)."""
        reply = self.send_raw(packb(obs))
        if reply.get("type") == "error":
            raise PolicyServerError(reply["error"])
        self.last_server_ms = reply.get("server_ms")
        return reply["action"]

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
