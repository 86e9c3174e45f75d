"""One writer per output folder (dopr.folder_lock), with real processes: a second `dopr experiment`, `dopr train` or
`dopr expert train` on a folder another process writes is refused at once, naming that process; a SIGKILLed holder
leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dopr.folder_lock import FolderBusy, FolderLock

HOLD = ("import sys, time\nfrom dopr.folder_lock import FolderLock\n"
        "lock = FolderLock.acquire(sys.argv[1], 'dopr experiment')\nprint('held', flush=True)\ntime.sleep(600)\n")


def hold(folder) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def dopr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dopr", *args], capture_output=True, text=True, timeout=300)


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    study = tmp_path / "study"
    holder = hold(study)
    try:
        with pytest.raises(FolderBusy, match=rf"dopr experiment \(pid {holder.pid}\) is writing there"):
            FolderLock.acquire(study, "dopr experiment")
        # the command line refuses before collecting anything, and names the process
        refused = dopr("experiment", "--tasks", "lift", "--policies", "mlp", "--optims", "adamw", "--seeds", "1",
                       "--steps", "10", "--out", str(study))
        assert refused.returncode == 2 and f"(pid {holder.pid}) is writing there" in refused.stderr
        assert not (study / "demos").exists() and not (study / "experiment.json").exists()
        # `dopr train` on a run folder held by another process: refused the same way
        run = study / "runs" / "r"
        with FolderLock.acquire(run, "dopr train"):
            refused = dopr("train", "--data", str(tmp_path / "missing.zarr"), "--out", str(run))
        assert refused.returncode == 2 and f"dopr train (pid {os.getpid()}) is writing there" in refused.stderr
        assert "Traceback" not in refused.stderr  # one line, as every user error
        # and an expert's folder, whose SAC training resumes from it
        expert = tmp_path / "expert"
        with FolderLock.acquire(expert, "dopr expert train"):
            refused = dopr("expert", "train", "--task", "walker2d", "--steps", "100", "--out", str(expert))
        assert refused.returncode == 2 and f"dopr expert train (pid {os.getpid()}) is writing there" in refused.stderr
        assert not (expert / "sac_config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock: the next writer goes on at once
    started = time.monotonic()
    with FolderLock.acquire(study, "dopr experiment"):
        assert (study / ".lock").read_text() == f"dopr experiment (pid {os.getpid()})\n"
    assert time.monotonic() - started < 5
