"""Wire format of the policy server: msgpack with numpy arrays, the encoding openpi uses.

An array travels as a map ``{"__ndarray__": True, "data": raw bytes, "dtype": str, "shape": list}``
and a numpy scalar as ``{"__npgeneric__": True, "data": scalar.item(), "dtype": ...}``, as openpi
sends it; a scalar whose data is its raw bytes (what dopr sent before) is read too. Only plain numeric
and boolean dtypes are accepted: object arrays would need pickle, and decoding must never run
code from the wire.

Messages (all msgpack maps):
- server -> client on connect: the metadata ``{"type": "metadata", ...}`` (see ``server.py``);
- client -> server: an observation dict ``{key: array}``;
- server -> client: ``{"type": "action", "action": array, "server_ms": float}`` or
  ``{"type": "error", "error": str}``.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# "kind" codes numpy uses for dtypes that are plain bytes in memory: bool, signed/unsigned int, float.
_ALLOWED_KINDS = frozenset("biuf")


class ProtocolError(ValueError):
    """A message that is not valid msgpack, or holds an array this protocol does not carry."""


def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject:
        raise ProtocolError(f"dtype {dtype.str!r} cannot be sent: only bool, int, uint and float arrays")
    return dtype


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            dtype = _check_dtype(np.dtype(obj[b"dtype"]))
            shape = tuple(int(s) for s in obj[b"shape"])
            data = obj[b"data"]
            if any(s < 0 for s in shape) or len(data) != dtype.itemsize * int(np.prod(shape)):
                raise ProtocolError(
                    f"array of shape {shape} and dtype {dtype.str} needs "
                    f"{dtype.itemsize * int(np.prod(shape))} bytes, got {len(data)}"
                )
            # frombuffer shares the message's bytes and is read-only; copy so callers own their arrays.
            return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
        except (KeyError, TypeError) as err:
            raise ProtocolError(f"malformed array entry: {err!r}") from None
    if b"__npgeneric__" in obj:
        try:
            dtype = _check_dtype(np.dtype(obj[b"dtype"]))
            data = obj[b"data"]
            if isinstance(data, bytes):
                return np.frombuffer(data, dtype=dtype)[0]
            if not isinstance(data, (bool, int, float)):
                raise TypeError(f"scalar data of type {type(data).__name__}")
            return dtype.type(data)
        except (KeyError, TypeError, IndexError, OverflowError, ValueError) as err:
            raise ProtocolError(f"malformed numpy scalar entry: {err!r}") from None
    return obj


def packb(obj: Any) -> bytes:
    """Encode a message (nested dicts/lists of numbers, strings, numpy arrays) to bytes."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode bytes from ``packb``; raises ProtocolError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}")
    try:
        # strict_map_key=False: the array marker keys are bytes, not str.
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as err:  # msgpack raises several unrelated types for corrupt input
        raise ProtocolError(f"not a valid msgpack message: {type(err).__name__}: {err}") from None
