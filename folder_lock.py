"""One writer per output folder: a second `dopr train` on the same run, or a second `dopr experiment` on the same
study, is refused at once instead of training the same runs twice and overwriting each other's checkpoints.

    lock = FolderLock.acquire("out/study", "dopr experiment")   # FolderBusy names the process holding it
    ...
    lock.release()                                               # or let the process end

The lock is fcntl.flock on FOLDER/.lock: the kernel releases it when its process dies, so a killed run leaves no
stale lock behind and resumes at once. The file holds the holder's pid and command, for the message. Where flock
does not exist (not Linux or macOS) no lock is taken.

Standard library only.
"""

from __future__ import annotations

import os

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class FolderBusy(OSError):
    """The folder is being written by another process (an OSError, as the failed flock is: the CLI's user errors)."""


class FolderLock:
    def __init__(self, file) -> None:
        self._file = file

    @classmethod
    def acquire(cls, folder, command: str) -> FolderLock:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ".lock")
        file = open(path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise FolderBusy(f"{folder}: {holder} is writing there (lock {path}); wait for it to end or stop "
                                 f"it, then run this again (finished work is reused)") from None
        file.seek(0)
        file.truncate()
        file.write(f"{command} (pid {os.getpid()})\n")
        file.flush()
        return cls(file)

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor drops the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
