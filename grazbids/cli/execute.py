"""Run the Nipype workflow and find out which participants failed.

Independent participant sub-workflows keep running when one of them crashes (unless
--stop-on-first-crash); Nipype then raises one exception at the very end. A status
callback records every failing node as it happens, and :func:`node_owner` maps it back
to its participant, so the summary can name who failed and where the crash files are.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path

from ..config import RunConfig, participant_workflow_name
from ..workflows.base import node_owner
from .summary import RunReport

LOGGER = logging.getLogger("grazbids")
WORKFLOW_OWNER = "workflow"  # failures outside any participant or the group step


class NodeTracker:
    """Nipype status callback: progress messages and failed nodes per participant."""

    def __init__(self, workflow, end_needs_start: bool = False):
        from nipype.interfaces.utility import IdentityInterface

        self.expected = defaultdict(set)
        for name in workflow.list_node_names():
            # Nipype drops plain identity nodes (input/output nodes) before running
            if isinstance(workflow.get_node(name).interface, IdentityInterface):
                continue
            self.expected[node_owner(name) or WORKFLOW_OWNER].add(name)
        # Nipype's Linear plugin also reports "end" for nodes it skipped after an upstream
        # crash (without a "start"); other plugins report cached nodes by "end" alone
        self.end_needs_start = end_needs_start
        self.started: set[str] = set()
        self.finished = defaultdict(set)
        self.failed: dict[str, list[str]] = defaultdict(list)
        self.announced: set[str] = set()

    @staticmethod
    def _relative_name(node) -> str:
        # list_node_names() omits the top workflow's name; keep the same form here
        return node.fullname.split(".", 1)[1] if "." in node.fullname else node.fullname

    @classmethod
    def owner(cls, node) -> str:
        """Participant (or group step) of a node: by its name, else by its hierarchy or
        its working folder (MapNode parts and some plugins report names without them)."""
        for where in (cls._relative_name(node), getattr(node, "_hierarchy", None) or "",
                      str(getattr(node, "base_dir", None) or "").replace(os.sep, ".")):
            owner = node_owner(where)
            if owner:
                return owner
        return WORKFLOW_OWNER

    def __call__(self, node, status: str) -> None:
        name = self._relative_name(node)
        owner = self.owner(node)
        if status == "start":
            self.started.add(name)
        elif status == "exception":
            self.failed[owner].append(name)
            LOGGER.error("%s: step %s failed", owner, name)
        elif status == "end":
            if self.end_needs_start and name not in self.started:
                return
            self.finished[owner].add(name)
            LOGGER.debug("%s: step %s done", owner, name)
            if owner not in self.announced and self.expected[owner] <= self.finished[owner]:
                self.announced.add(owner)
                if owner != WORKFLOW_OWNER:
                    LOGGER.info("%s: finished", owner)


def configure_threads(omp_nthreads: int) -> None:
    """Thread limits for every library a node may use; worker processes inherit them."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(omp_nthreads)
    if "torch" in sys.modules:  # already imported: the variable alone is read too late
        sys.modules["torch"].set_num_threads(omp_nthreads)


def configure_nipype(workflow, config: RunConfig) -> None:
    workflow.config["execution"] = {
        # nodes without their own crash folder (participant nodes use sub-<label>/log/)
        "crashdump_dir": str(config.log_dir),
        "crashfile_format": "txt",  # readable without nipype; no pickles
        "stop_on_first_crash": config.stop_on_first_crash,
        "remove_unnecessary_outputs": False,  # keeps the work folder usable for re-runs
        "create_report": True,
        # Nipype's scheduler submits work once per poll (default every 2 s): with many
        # short nodes (masks, sinks, reports: 0.1 s each) a 60-participant run spent most of
        # its time waiting for the next poll
        "poll_sleep_duration": 0.2,
    }


def _crash_folders(config: RunConfig, owner: str) -> list[Path]:
    folders = [config.log_dir]
    if owner.startswith("sub-"):
        folders.insert(0, config.output_dir / owner / "log")
    return folders


def existing_crash_files(config: RunConfig) -> set[Path]:
    """Crash files already there before the run (from earlier runs): not ours to report."""
    found = set(config.log_dir.glob("crash-*"))
    for folder in config.output_dir.glob("sub-*/log"):
        found.update(folder.rglob("crash-*"))
    return found


def _crash_files(config: RunConfig, owner: str, nodes: list[str], old: set[Path]) -> list[str]:
    """New crash files of one owner: everything in its sub-<label>/log/ folder, and text
    crash files in the shared log folder whose first line names one of its nodes."""
    found = []
    for folder in _crash_folders(config, owner):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("crash-*")):
            if path in old:
                continue
            if folder == config.log_dir:
                try:
                    first = path.read_text(errors="replace").split("\n", 1)[0]
                except OSError:
                    continue
                if not any(first.endswith(f".{node}") for node in nodes):
                    continue
            found.append(str(path))
    return found


def run_workflow(workflow, config: RunConfig, report: RunReport) -> None:
    """Run; fill report.failed with every participant (or group step) that did not finish.

    A participant counts as succeeded only when every one of its steps finished and every
    derivative its sinks write exists; an interruption (SIGINT/SIGTERM) stops the worker
    processes and is recorded, and the summary is still written by the caller.
    """
    from ..workflows.expected import expected_derivatives
    from .interrupt import Interrupted, stop_workers

    configure_nipype(workflow, config)
    tracker = NodeTracker(workflow, end_needs_start=config.plugin == "Linear")
    plugin_args = {**config.plugin_args, "status_callback": tracker}
    expected_files = {f"sub-{label}": expected_derivatives(node)
                      for label in report.processed
                      if (node := workflow.get_node(participant_workflow_name(label))) is not None}
    LOGGER.info("Running %d step(s) with the %s plugin (%s); work folder %s",
                sum(len(v) for v in tracker.expected.values()), config.plugin,
                ", ".join(f"{k}={v}" for k, v in config.plugin_args.items()) or "defaults",
                config.work_dir)
    old_crash_files = existing_crash_files(config)
    # Nipype's MultiProc runs gc.collect() after every node it runs in this process (the
    # sinks: ~20 per participant). Freezing the objects that exist now (the workflow graph,
    # imported modules) keeps each collection small: a 60-participant run was bound by it.
    gc.freeze()
    try:
        workflow.run(plugin=config.plugin, plugin_args=plugin_args)
    except Interrupted as signal_:
        report.interrupted = signal_.name
        report.run_error = f"interrupted by {signal_.name}"
        LOGGER.error("%s received: stopping the running steps", signal_.name)
        stopped = stop_workers()
        LOGGER.info("stopped %d worker process(es)", stopped)
    except Exception as err:  # Nipype raises RuntimeError or re-raises the node's error
        report.run_error = " ".join(str(err).split())[:2000]
    finally:
        gc.unfreeze()
    for owner, nodes in tracker.failed.items():
        report.failed[owner] = {"nodes": nodes, "crashfiles": _crash_files(config, owner, nodes, old_crash_files)}
    if report.run_error and not tracker.failed and not report.interrupted:
        # the run ended without any node failing: plugin or graph problem, all affected
        report.failed[WORKFLOW_OWNER] = {"nodes": [], "crashfiles": [], "not_run": report.run_error}
    _check_completeness(report, tracker, expected_files)
    for label in report.succeeded():
        _move_old_crash_files(config, f"sub-{label}", old_crash_files)
    if config.is_group_level:
        if "group" in report.failed:
            report.group_step = "failed"
        elif tracker.expected["group"] <= tracker.finished["group"]:
            report.group_step = "finished"
        else:
            report.group_step = "not run"
            reason = (f"the group step did not finish: interrupted by {report.interrupted}" if report.interrupted
                      else "the group step did not run because an earlier step failed")
            report.failed["group"] = {"nodes": [], "crashfiles": [], "not_run": reason}


def _check_completeness(report: RunReport, tracker: NodeTracker, expected_files: dict) -> None:
    """A participant with an unfinished step or a missing derivative has not succeeded."""
    for label in report.processed:
        owner = f"sub-{label}"
        if owner in report.failed:
            continue
        unfinished = sorted(tracker.expected[owner] - tracker.finished[owner])
        missing = [str(path) for path in expected_files.get(owner, []) if not path.exists()]
        if not unfinished and not missing:
            continue
        if report.interrupted and unfinished:
            reason = f"interrupted by {report.interrupted} before it finished"
        elif unfinished:
            reason = f"{len(unfinished)} step(s) did not finish: {', '.join(unfinished[:5])}"
        else:
            reason = "ran, but expected output(s) are missing"
        if missing and not (report.interrupted and unfinished):  # an interrupted one lacks them anyway
            reason += f"; {len(missing)} expected output(s) missing: {', '.join(missing[:5])}"
            reason += " ..." if len(missing) > 5 else ""
        LOGGER.error("%s: %s", owner, reason)
        report.failed[owner] = {"nodes": [], "crashfiles": [], "not_run": reason, "missing_outputs": missing}


def _move_old_crash_files(config: RunConfig, owner: str, old: set[Path]) -> None:
    """Crash files of an earlier failed run of a participant that has now succeeded leave
    its derivatives folder (into the work folder): they describe a problem that is gone."""
    folder = config.output_dir / owner / "log"
    stale = [path for path in old if folder in path.parents]
    if not stale:
        return
    target = config.work_dir / "resolved_crashfiles" / owner
    for path in stale:
        destination = target / path.relative_to(folder)
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        except OSError as err:
            LOGGER.warning("%s: cannot move the old crash file %s: %s", owner, path, err)
            return
    for empty in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True) + [folder]:
        with contextlib.suppress(OSError):
            empty.rmdir()  # only when empty
    LOGGER.info("%s: succeeded now; moved %d crash file(s) of an earlier run to %s", owner, len(stale), target)
