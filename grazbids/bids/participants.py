"""participants.tsv: read it, check the classification target column, read its values."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..exitcodes import ExitCode, GrazbidsError

LOGGER = logging.getLogger("grazbids")
MISSING_VALUES = {"", "n/a"}  # BIDS writes missing values as n/a


@dataclass
class TargetSummary:
    column: str
    classes: dict[str, str] = field(default_factory=dict)  # participant label -> class value
    without_value: list[str] = field(default_factory=list)  # n/a, empty, or no row

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for value in self.classes.values():
            counts[value] = counts.get(value, 0) + 1
        return dict(sorted(counts.items()))


def read_participants_table(bids_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = bids_dir / "participants.tsv"
    if not path.is_file():
        raise GrazbidsError(ExitCode.MISSING_INPUT,
                            f"{path} not found: the group level reads its target column from it")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise GrazbidsError(ExitCode.BAD_DATA, f"{path} is not a readable TSV file: {err}") from None
    except OSError as err:
        raise GrazbidsError(ExitCode.IO_ERROR, f"cannot read {path}: {err.strerror or err}") from None
    if "participant_id" not in columns:
        raise GrazbidsError(ExitCode.BAD_DATA, f"{path} has no participant_id column")
    return columns, rows


def participant_values(path: Path, rows: list[dict[str, str]], column: str) -> dict[str, str]:
    """participant label -> value of ``column``; 65 when a participant has rows that disagree
    (which one is right cannot be guessed; the last row must not silently win)."""
    values: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        pid = (row.get("participant_id") or "").strip()
        label = pid[4:] if pid.startswith("sub-") else pid
        value = (row.get(column) or "").strip()
        if label in values and values[label] != value:
            raise GrazbidsError(ExitCode.BAD_DATA,
                                f"{path}: sub-{label} has more than one row with different {column!r} values "
                                f"({values[label]!r}, then {value!r} on line {line}); keep one row per participant")
        if label in values:
            LOGGER.warning("%s: sub-%s is listed twice (line %d) with the same %r value", path, label, line, column)
        values[label] = value
    return values


def read_target_values(bids_dir: Path, column: str) -> dict[str, str]:
    """participant label (without sub-) -> value of ``column``; n/a and empty values left out."""
    columns, rows = read_participants_table(Path(bids_dir))
    if column not in columns:
        raise GrazbidsError(ExitCode.BAD_DATA, f"{Path(bids_dir) / 'participants.tsv'}: no column {column!r} "
                                               f"(columns: {', '.join(columns)})")
    values = participant_values(Path(bids_dir) / "participants.tsv", rows, column)
    values = {label: value for label, value in values.items() if value not in MISSING_VALUES}
    return values


def check_target(bids_dir: Path, column: str, participants: list[str], cv_folds: int) -> TargetSummary:
    """Classes of ``column`` for the selected participants; 65 when training is impossible."""
    path = bids_dir / "participants.tsv"
    columns, rows = read_participants_table(bids_dir)
    if column not in columns:
        usable = [c for c in columns if c != "participant_id"]
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"--target-column {column!r} is not a column of {path} "
                            f"(columns: {', '.join(usable) or 'none'})")
    values = participant_values(path, rows, column)

    summary = TargetSummary(column)
    for label in participants:
        value = values.get(label, "")
        if value in MISSING_VALUES:
            summary.without_value.append(label)
        else:
            summary.classes[label] = value

    counts = summary.class_counts()
    n_missing = len(summary.without_value)
    missing_note = (f"; {n_missing} selected participant(s) have no value (n/a, empty or no row) "
                    f"and are left out" if n_missing else "")
    described = ", ".join(f"{value!r}: {n}" for value, n in counts.items()) or "none"
    if len(counts) < 2:
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"--target-column {column!r} needs at least two classes among the selected "
                            f"participants, found {len(counts)} ({described}){missing_note}")
    singletons = [value for value, n in counts.items() if n < 2]
    if singletons:
        hint = (" (it looks continuous; grazbids trains classifiers, so bin it into classes first)"
                if len(singletons) > len(counts) / 2 else "")
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"--target-column {column!r}: class(es) {', '.join(map(repr, singletons))} "
                            f"have a single participant, too few to both train and validate{hint}")
    if len(summary.classes) < cv_folds:
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"--cv-folds {cv_folds} needs at least {cv_folds} participants with a "
                            f"{column!r} value, found {len(summary.classes)}{missing_note}")
    LOGGER.info("Target %r: %d participants, classes %s%s", column, len(summary.classes), described, missing_note)
    if min(counts.values()) < cv_folds:
        LOGGER.warning("Target %r: the smallest class has fewer participants than --cv-folds %d, so "
                       "some validation folds will not contain it", column, cv_folds)
    return summary
