"""Synchronous client for the policy server; needs only numpy, msgpack and websockets.

    with PolicyClient("127.0.0.1", 8000) as client:
        print(client.metadata["obs_keys"], client.metadata["control_freq"])
        chunk = client.infer({"robot0_eef_pos": history, ...})   # (To, ...) per key -> (Ta, A)

Pair it with ``PolicyRunner.from_client(client)`` for history keeping and one action per tick.

The client talks to openpi servers as well (dopr's `--protocol openpi`, or openpi's own): their first
message is plain metadata without ``"type": "metadata"``, a reply holds ``actions``, and an error
comes as a text frame. ``client.protocol`` says which kind of server answered.
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
        first = self._ws.recv(timeout=timeout)
        if isinstance(first, str):
            raise PolicyServerError(f"server at {host}:{port} started with a text message: {first[:500]}")
        self.metadata: dict = unpackb(first)
        if not isinstance(self.metadata, dict):
            raise PolicyServerError(f"server at {host}:{port} did not start with metadata: {self.metadata!r}")
        self.protocol = "native" if self.metadata.get("type") == "metadata" else "openpi"
        self.last_server_ms: float | None = None

    def send_raw(self, payload: bytes | str) -> dict:
        """Send bytes as they are and return the decoded reply (for testing the server's checks);
        a text-frame reply (an openpi server's error) raises PolicyServerError."""
        self._ws.send(payload)
        reply = self._ws.recv(timeout=self.timeout)
        if isinstance(reply, str):
            raise PolicyServerError(reply)
        return unpackb(reply)

    def infer(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Send ``obs[key]`` (To, ...) or (B, To, ...) -- one step (...) to an openpi server, which keeps
        the history -- and return the action chunk (Ta, A) or (B, Ta, A)."""
        reply = self.send_raw(packb(obs))
        if reply.get("type") == "error":
            raise PolicyServerError(reply["error"])
        self.last_server_ms = reply.get("server_ms")
        return reply["actions"] if self.protocol == "openpi" else reply["action"]

    def reset(self) -> None:
        """Start a new episode: an openpi server that offers the reset endpoint forgets its history
        (a native server keeps none; the client's PolicyRunner does)."""
        if self.protocol == "openpi" and "reset" in self.metadata.get("endpoints", ()):
            self.send_raw(packb({"endpoint": "reset"}))

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
