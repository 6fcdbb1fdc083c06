"""Checks that output and work folders can be written, without leaving anything behind."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..exitcodes import ExitCode, GrazbidsError


def check_writable_folder(path: Path, what: str) -> None:
    """Raise exit code 73 unless ``path`` is, or could be created as, a writable folder.

    Nothing is created: the probe is a nameless temporary file in the deepest existing
    ancestor (``os.access`` is not enough: it ignores read-only mounts and lies for root).
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        detail = "is a file" if existing == path else f"{existing} is a file, not a folder"
        raise GrazbidsError(ExitCode.CANNOT_CREATE_OUTPUT, f"cannot use {what} {path}: {detail}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise GrazbidsError(ExitCode.CANNOT_CREATE_OUTPUT,
                            f"cannot write {what} {path}: {existing} is not writable "
                            f"({err.strerror or err})") from None


def make_folder(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GrazbidsError(ExitCode.CANNOT_CREATE_OUTPUT,
                            f"cannot create {what} {path}: {err.strerror or err}") from None
    return path
