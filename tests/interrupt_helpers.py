"""Ctrl-C as a terminal sends it: SIGINT to a real command's whole process group, once it has written
some episodes."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def _wait_for_lines(path, n, proc, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"finished before {n} episodes were written: rc {proc.returncode}")
        if os.path.isfile(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path}: fewer than {n} episodes after {timeout} s")


def ctrl_c_after_lines(cmd, episodes_file, n) -> int:
    """Run `cmd` as a terminal would, press Ctrl-C (SIGINT to its process group) once `episodes_file` has n
    lines, and return its exit code."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for_lines(episodes_file, n, proc)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


