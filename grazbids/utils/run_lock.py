"""One grazbids run per work folder (and per group output) at a time.

Two runs sharing a work folder overwrite each other's Nipype node folders and fail with
raw FileNotFoundErrors; two group runs on one output_dir write the same model and report.
An advisory ``flock`` is held for the whole run: the kernel drops it when the process
ends, however it ends, so a killed run never leaves a stale lock behind. The lock file
names its holder (host, pid, start time) for the message the second run prints.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from datetime import datetime
from pathlib import Path

from ..exitcodes import ExitCode, GrazbidsError

LOCK_NAME = "grazbids.lock"


class RunLock:
    def __init__(self, handle, path: Path):
        self._handle = handle
        self.path = path

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


def lock_folder(folder: Path, what: str, lock_name: str = LOCK_NAME) -> RunLock:
    """Hold ``folder/<lock_name>`` exclusively; exit code 75 if another run holds it."""
    path = folder / lock_name
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise GrazbidsError(ExitCode.CANNOT_CREATE_OUTPUT, f"cannot create the lock file {path}: "
                                                            f"{err.strerror or err}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()  # a file system without locks (some network mounts): run unlocked
            return RunLock(None, path)
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise GrazbidsError(ExitCode.BUSY,
                            f"{what} {folder} is in use by another grazbids run ({holder}); wait until it "
                            "has finished, or give this run its own folder (-w/--work-dir for the work "
                            "folder)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, started "
                 f"{datetime.now().isoformat(timespec='seconds')}\n")
    handle.flush()
    return RunLock(handle, path)
