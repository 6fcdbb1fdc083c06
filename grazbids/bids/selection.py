"""Which participants and which T1w images a run works on (pybids queries)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..exitcodes import ExitCode, GrazbidsError

T1W_EXTENSIONS = [".nii", ".nii.gz"]


@dataclass
class Selection:
    t1w_files: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    without_t1w: list[str] = field(default_factory=list)  # selected, but no T1w image found


def check_bids_root(bids_dir: Path) -> dict:
    """The input's dataset_description.json content; 66 if missing, 65 if unreadable."""
    if not bids_dir.is_dir():
        raise GrazbidsError(ExitCode.MISSING_INPUT, f"input dataset {bids_dir} does not exist or is not a folder")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise GrazbidsError(ExitCode.MISSING_INPUT,
                            f"{bids_dir} is not a BIDS dataset: {description.name} is missing")
    try:
        content = json.loads(description.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GrazbidsError(ExitCode.BAD_DATA, f"{description} is not valid JSON: {err}") from None
    except OSError as err:
        raise GrazbidsError(ExitCode.IO_ERROR, f"cannot read {description}: {err.strerror or err}") from None
    if not isinstance(content, dict):
        raise GrazbidsError(ExitCode.BAD_DATA, f"{description} must hold a JSON object")
    return content


def load_layout(bids_dir: Path):
    """Index the raw dataset (derivatives/ is not indexed; validation is done separately)."""
    from bids import BIDSLayout

    try:
        return BIDSLayout(bids_dir, validate=False)
    except OSError as err:
        raise GrazbidsError(ExitCode.IO_ERROR, f"cannot index {bids_dir}: {err}") from None
    except Exception as err:  # pybids raises assorted errors for malformed datasets
        raise GrazbidsError(ExitCode.BAD_DATA, f"pybids cannot index {bids_dir}: {err}") from None


def _short_list(labels, limit: int = 10) -> str:
    labels = [f"sub-{label}" for label in labels]
    more = f" and {len(labels) - limit} more" if len(labels) > limit else ""
    return ", ".join(labels[:limit]) + more


def select_participants(layout, requested: tuple[str, ...], sessions: tuple[str, ...] = ()) -> Selection:
    """T1w images of the requested participants (all when none requested).

    Unknown labels stop the run (66): a typo must not silently shrink a study. A known
    participant without T1w images (after the session filter) is reported and skipped.
    """
    available = sorted(layout.get_subjects())
    unknown = [label for label in requested if label not in available]
    if unknown:
        raise GrazbidsError(
            ExitCode.MISSING_INPUT,
            f"participant(s) not found in {layout.root}: {_short_list(unknown)} "
            f"(the dataset has {_short_list(available) or 'no sub-* folders'})",
        )
    labels = list(requested) or available
    selection = Selection()
    filters = {"session": list(sessions)} if sessions else {}
    for label in labels:
        files = layout.get(subject=label, datatype="anat", suffix="T1w", extension=T1W_EXTENSIONS,
                           return_type="filename", **filters)
        if files:
            selection.t1w_files[label] = tuple(sorted(Path(f) for f in files))
        else:
            selection.without_t1w.append(label)
    return selection
