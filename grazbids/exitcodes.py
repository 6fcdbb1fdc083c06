"""Process exit codes of the ``grazbids`` command (BIDS execution spec, BSD sysexits).

Every early stop raises :class:`GrazbidsError` carrying one of these codes; ``main``
turns it into the process exit status, so callers (schedulers, BIDS platforms) can tell
a bad dataset from a crashed pipeline without parsing logs.
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # the run finished but some participant (or the group step) failed
    VALIDATION_FAILED = 16  # bids-validator reported errors
    UNKNOWN_LEVEL = 17  # analysis level is neither participant nor group
    NO_FILES = 18  # participant/session filters left nothing to process
    USAGE = 64  # bad command line (EX_USAGE)
    BAD_DATA = 65  # inputs exist but are unusable (EX_DATAERR)
    MISSING_INPUT = 66  # an input file or folder does not exist (EX_NOINPUT)
    CANNOT_CREATE_OUTPUT = 73  # output or work folder cannot be created/written (EX_CANTCREAT)
    IO_ERROR = 74  # reading or writing failed mid-way (EX_IOERR)
    BUSY = 75  # another run holds the work folder or the group outputs (EX_TEMPFAIL: retry later)
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + signal number, as a shell reports it
    TERMINATED = 143  # SIGTERM (scheduler, docker stop, Kubernetes): workers stopped, summary written


class GrazbidsError(Exception):
    """A problem that ends the run before (or instead of) processing, with its exit code."""

    def __init__(self, code: ExitCode, message: str):
        super().__init__(message)
        self.code = ExitCode(code)
        self.message = message

    def __str__(self) -> str:
        return self.message
