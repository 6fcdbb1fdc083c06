"""What happened to each participant in a run: logged at the end and saved under logs/."""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from .. import __version__
from ..exitcodes import ExitCode

LOGGER = logging.getLogger("grazbids")


@dataclass
class RunReport:
    analysis_level: str
    started: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))
    finished: str | None = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))
    # requested participants without any T1w image (after the session filter)
    without_t1w: list[str] = field(default_factory=list)
    requested_without_t1w: bool = False  # they were named explicitly: counts as failure
    # participant label -> problems found by the input checks (participant not processed)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    # group level: participants left out for lack of a target value; reused preprocessing
    without_target: list[str] = field(default_factory=list)
    reused_preprocessing: list[str] = field(default_factory=list)
    processed: list[str] = field(default_factory=list)  # participants whose workflow ran
    # "sub-<label>" / "group" / "workflow" -> failed node names and crash files
    failed: dict[str, dict] = field(default_factory=dict)
    group_step: str | None = None  # group level: "finished", "failed" or "not run"
    run_error: str | None = None  # message of the exception that ended the Nipype run
    interrupted: str | None = None  # "SIGINT"/"SIGTERM" when a signal stopped the run
    exit_code: int | None = None

    @property
    def stamp(self) -> str:
        """Start time and process id: unique even for array jobs starting in the same second."""
        started = self.started.replace(":", "").replace("-", "").replace("T", "-")
        return f"{started}-{os.getpid()}"

    def succeeded(self) -> list[str]:
        whole_run = self.failed.get("workflow")
        if whole_run is not None and not whole_run.get("nodes"):
            return []  # the workflow could not be built or the plugin failed: nothing ran
        failed = set(self.failed)
        return [label for label in self.processed if f"sub-{label}" not in failed]

    def final_exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.TERMINATED if self.interrupted == "SIGTERM" else ExitCode.INTERRUPTED
        if self.failed or self.excluded or (self.without_t1w and self.requested_without_t1w):
            return ExitCode.FAILURE
        return ExitCode.OK

    def lines(self) -> list[str]:
        if self.processed or self.analysis_level != "group":
            head = f"{len(self.succeeded())} of {len(self.processed)} processed participant(s) succeeded"
        else:  # a group run whose participants were all preprocessed before
            head = "no participant needed preprocessing"
        out = [f"grazbids {__version__} {self.analysis_level} level: {head}"]
        if self.interrupted:
            out.append(f"  INTERRUPTED by {self.interrupted}: running steps were stopped; run the same command "
                       "again to resume (finished steps are kept in the work folder)")
        if self.group_step:
            out.append(f"  group step: {self.group_step}")
        if self.reused_preprocessing:
            out.append(f"  reused earlier preprocessing of {len(self.reused_preprocessing)} participant(s)")
        for label in self.without_t1w:
            out.append(f"  SKIPPED sub-{label}: no T1w image found")
        for label, problems in self.excluded.items():
            for problem in problems:
                out.append(f"  EXCLUDED sub-{label}: {problem}")
        if self.without_target:
            out.append(f"  {len(self.without_target)} participant(s) without a target value left out: "
                       + ", ".join(f"sub-{label}" for label in self.without_target))
        for owner, info in self.failed.items():
            nodes = ", ".join(info.get("nodes", [])) or "see the log"
            out.append(f"  FAILED {owner}: {nodes}")
            for crash in info.get("crashfiles", []):
                out.append(f"    crash file: {crash}")
            if info.get("not_run"):
                out.append(f"    {info['not_run']}")
        if self.run_error and not self.failed:
            out.append(f"  run error: {self.run_error}")
        return out

    def log(self) -> None:
        level = logging.INFO if self.final_exit_code() == ExitCode.OK else logging.ERROR
        for line in self.lines():
            LOGGER.log(level, line)

    def write(self, log_dir: Path) -> Path:
        from ..utils.dataset import write_text_atomic

        path = log_dir / f"grazbids_{self.analysis_level}_{self.stamp}_summary.json"
        return write_text_atomic(path, json.dumps(asdict(self), indent=2, default=str) + "\n")
