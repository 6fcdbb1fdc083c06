"""Logging inside Nipype worker processes.

The command configures logging in its own process only; a MultiProc worker (a fresh
forkserver child) has no handler, so grazbids' INFO messages from a node (group training:
folds, epochs, "resuming after epoch ...") were lost. ``ensure_process_logging`` gives such
a process the command's format on stderr and appends to the run's log file, whose path
the command exports in GRAZBIDS_LOG_FILE.
"""
from __future__ import annotations

import logging
import os
import sys

LOG_FILE_ENV = "GRAZBIDS_LOG_FILE"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def ensure_process_logging() -> None:
    """Add handlers for the 'grazbids' loggers unless this process already has some."""
    logger = logging.getLogger("grazbids")
    if logging.getLogger().handlers or logger.handlers:
        return  # the command's own process (or a test, or a script that set up logging)
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = os.environ.get(LOG_FILE_ENV)
    if path:
        try:
            handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
        except OSError:
            pass  # the command already warned that its log file cannot be written
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
