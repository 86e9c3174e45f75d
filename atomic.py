"""Atomic file writes: a file is either its old complete self or its new complete self, never half.

    with atomic_path("out/model.onnx") as tmp:   # any writer that takes a path
        torch.onnx.export(..., tmp)
    write_json_atomic("out/results.json", summary)
    write_text_atomic("out/report.md", markdown)
    records = read_jsonl("out/run/metrics.jsonl")  # an append-only log, whatever a kill left of it

The new content goes to a temporary file in the target's folder (a rename is atomic only within
one file system), is fsynced, then os.replace'd over the target; on an error the temporary file is
deleted and the target is left as it was. The temporary name keeps the target's extension, for
writers that pick a format from it (imageio, matplotlib). The file gets the mode a new file gets
(0666 less the umask), so a controller account can read what a training account wrote: tempfile's
0600 (and safetensors', which replaces the file it is given) would not let it.

JSON written here is strict JSON: NaN and infinities become null (`json_safe`), since Python's
json writes the bare tokens NaN and Infinity, which other JSON readers reject.

Standard library only: every stage (deploy's light controller-side modules, the spawned simulator
workers) may import it without pulling in numpy, zarr or torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator


def default_file_mode() -> int:
    """0666 less the process's umask: the mode open() gives a new file."""
    mask = os.umask(0o077)  # the only way to read it; meanwhile a new file is private, never wider
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block ends without an error, the file
    written there is fsynced and renamed over `path` (folders are created as needed)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp" + os.path.splitext(name)[1])
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text: str) -> None:
    """Replace the file at `path` by `text`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def json_default(x):
    """JSON for what json does not know: numpy scalars and arrays (duck-typed through `tolist`,
    so numpy is not imported here) and sets."""
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, frozenset)):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def json_safe(obj):
    """`obj` with every float NaN or +-inf replaced by None (JSON null), through dicts, lists and
    tuples, numpy values turned into Python ones: what `json.dumps(..., allow_nan=False)` accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return json_safe(obj.tolist())
    return obj


def json_line(record) -> str:
    """One line of a JSON-lines log (metrics.jsonl, episodes.jsonl): strict JSON, NaN/inf as null."""
    return json.dumps(json_safe(record), allow_nan=False, default=json_default) + "\n"


def write_json_atomic(path, obj, indent: int | None = 2) -> None:
    """Replace the file at `path` by `obj` as strict JSON (key order kept; numpy values as lists/numbers;
    NaN/inf as null), atomically."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=json_default)
    write_text_atomic(path, text + "\n")


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file that is appended one flushed line at a time (metrics.jsonl,
    episodes.jsonl). Such a file cannot be replaced atomically on every line, so a kill can leave
    its last line cut short: lines that do not parse are skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
