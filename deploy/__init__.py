"""Deploy checkpoints to robot controllers: export, controller-side runtime, policy server and client.

Light to import (numpy, msgpack, websockets; torch/onnxruntime only when a model is loaded):
- ``PolicyRunner`` / ``ExportedModel`` (runtime.py): run an exported file one control tick at a time;
- ``PolicyClient`` (client.py) and ``PolicyServer`` (server.py): the websocket policy server, in dopr's
  protocol or openpi's (openpi.py: openpi-client's single steps, per-connection history, ``actions``);
- ``packb`` / ``unpackb`` (protocol.py): msgpack with numpy arrays.
Needs torch and dopr.policies (import the module directly):
- ``dopr.deploy.export.export_checkpoint`` (`dopr export`), ``dopr.deploy.load.load_model`` (`dopr serve`).
"""

from dopr.deploy.client import PolicyClient, PolicyServerError
from dopr.deploy.protocol import ProtocolError, packb, unpackb
from dopr.deploy.runtime import ExportedModel, PolicyRunner, TemporalEnsembler
from dopr.deploy.server import PolicyServer

__all__ = [
    "ExportedModel", "PolicyClient", "PolicyRunner", "PolicyServer", "PolicyServerError", "ProtocolError",
    "TemporalEnsembler", "packb", "unpackb",
]
