"""SIGTERM handled like Ctrl-C, with a bounded exit.

Schedulers (SLURM), ``docker stop`` and Kubernetes send SIGTERM, then SIGKILL after a
grace period (10-30 s). Python's default for SIGTERM is to die at once: no summary, and
the Nipype worker processes (children of a forkserver) went on registering as orphans.
Here both signals raise :class:`Interrupted` in the main thread; the run then stops its
worker processes, writes the summary and exits with 128 + the signal number. A watchdog
thread ends the process if the clean-up or Python's exit handlers (concurrent.futures
joins its worker threads at exit) hang.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

LOGGER = logging.getLogger("grazbids")
HANDLED = (signal.SIGINT, signal.SIGTERM)
WORKER_GRACE_S = 5.0  # SIGTERM to the workers, then SIGKILL
EXIT_DEADLINE_S = 20.0  # from the signal to the end of the process, whatever happens


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        super().__init__(self.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def signals_as_interrupts():
    """While active (main thread only), SIGINT and SIGTERM raise Interrupted once; later
    signals are ignored so the clean-up is not cut short (the watchdog bounds it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)
        exit_within(EXIT_DEADLINE_S, 128 + signum)
        raise Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in HANDLED:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_within(seconds: float, code: int) -> None:
    """End the process with ``code`` after ``seconds`` unless it has ended by then."""
    def watchdog():
        time.sleep(seconds)
        LOGGER.error("still running %.0f s after the interruption; exiting now", seconds)
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=watchdog, name="grazbids-exit-watchdog", daemon=True).start()


def descendants(pid: int | None = None) -> list[int]:
    """Process ids of every descendant of ``pid`` (this process), children first (Linux /proc)."""
    pid = os.getpid() if pid is None else pid
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue  # the process ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
        parents.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


# multiprocessing's resource tracker cleans up shared semaphores once this process ends;
# killed early, it is relaunched and reports every semaphore as a KeyError traceback
SPARED = ("multiprocessing.resource_tracker",)


def stop_workers(grace_s: float = WORKER_GRACE_S) -> int:
    """SIGTERM every descendant process (Nipype workers, their forkserver), SIGKILL the
    ones still alive after ``grace_s``; returns how many there were."""
    # the pool's threads report each killed worker as a BrokenProcessPool traceback: expected here
    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL)
    processes = [pid for pid in descendants() if not any(name in _command(pid) for name in SPARED)]
    for pid in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        _reap()
        alive = [pid for pid in alive if _alive(pid)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    _reap()
    return len(processes)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


def _reap() -> None:
    """Collect our own ended children (the forkserver) so they do not stay zombies."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
