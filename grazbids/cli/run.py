"""Entry point of the ``grazbids`` command (and ``python -m grazbids``).

Order of a run: parse the command line -> preflight checks (nothing written yet) ->
create output_dir and its dataset-level files -> build one Nipype workflow -> run it ->
log and save the run summary -> exit code (see grazbids.exitcodes).
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from datetime import datetime

# Never reach the network at run time: Nipype's version check (etelemetry) and
# TemplateFlow's skeleton update both run on import unless switched off.
os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")

from .. import __version__  # noqa: E402
from ..exitcodes import ExitCode, GrazbidsError  # noqa: E402
from ..utils.process_logging import LOG_FILE_ENV  # noqa: E402

LOGGER = logging.getLogger("grazbids")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_logging(verbosity: int) -> None:
    """Timestamped messages on stderr; grazbids at INFO (DEBUG with -vv)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_grazbids", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler._grazbids = True
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    LOGGER.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)


def route_nipype_logging(verbosity: int) -> None:
    """Send Nipype's messages through our handlers (it prints to stdout by default)."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = {0: "WARNING", 1: "INFO"}.get(verbosity, "DEBUG")
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    nipype_config.set("execution", "check_version", "false")
    nipype_logging.update_logging(nipype_config)
    nipype_root = logging.getLogger("nipype")
    for handler in list(nipype_root.handlers):
        nipype_root.removeHandler(handler)
    nipype_root.propagate = True


def hold_early_messages() -> logging.handlers.MemoryHandler:
    """Keep the preflight messages until the log file can be created in output_dir."""
    handler = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    handler._grazbids = True
    logging.getLogger().addHandler(handler)
    return handler


def add_log_file(log_dir, analysis_level: str, stamp: str,
                 early: logging.handlers.MemoryHandler) -> logging.Handler | None:
    """Log to output_dir/logs/ from now on, starting with the messages held so far."""
    path = log_dir / f"grazbids_{analysis_level}_{stamp}.log"
    logging.getLogger().removeHandler(early)
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as err:
        LOGGER.warning("cannot write the log file %s: %s", path, err)
        return None
    handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
    handler._grazbids = True
    early.setTarget(handler)
    early.close()  # flushes the held messages into the file
    logging.getLogger().addHandler(handler)
    os.environ[LOG_FILE_ENV] = str(path)  # Nipype workers append their messages to it too
    LOGGER.info("Log file: %s", path)
    return handler


def execute(argv: list[str] | None, adjust=None) -> int:
    """``adjust``: a function of the parsed RunConfig returning the one to run (the torchrun
    entry point forces in-process execution with it)."""
    from .parser import parse_args
    from .preflight import run_preflight
    from .summary import RunReport

    from .interrupt import signals_as_interrupts

    config = parse_args(argv)
    if adjust is not None:
        config = adjust(config)
    setup_logging(config.verbosity)
    early_messages = hold_early_messages()
    with signals_as_interrupts():  # SIGTERM (schedulers, docker stop) handled like Ctrl-C
        try:
            LOGGER.info("grazbids %s, %s level: %s -> %s", __version__, config.analysis_level,
                        config.bids_dir, config.output_dir)
            report = RunReport(config.analysis_level,
                               command=["grazbids", *(sys.argv[1:] if argv is None else argv)])
            config, source_description = run_preflight(config, report)
        except BaseException:
            logging.getLogger().removeHandler(early_messages)  # nothing is written: drop them
            raise
        return process(config, report, source_description, early_messages)


@contextlib.contextmanager
def stdout_to_stderr():
    """Point file descriptor 1 at stderr while the workflow runs: Nipype's logger in a
    worker process prints to stdout, and the docs promise an empty stdout. Worker processes
    inherit the descriptor."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def note_work_dir(work_dir) -> None:
    from ..utils.dataset import detect_container
    from .parser import is_temporary_work_dir

    if not is_temporary_work_dir(work_dir):
        LOGGER.info("Work folder: %s", work_dir)
        return
    container = detect_container()
    where = f"inside the {container['Type']} container, lost when it is removed" if container else "a temporary folder"
    LOGGER.info("Work folder: %s (%s; to resume or re-run cheaply later, pass -w/--work-dir with a folder "
                "that is kept%s)", work_dir, where, ", e.g. a mounted one" if container else "")


def configure_worker_nipype(config) -> None:
    """Nipype reads its settings afresh in every worker process: give the workers the
    command's log levels through a nipype.cfg in the work folder (NIPYPE_CONFIG_DIR)."""
    level = {0: "WARNING", 1: "INFO"}.get(config.verbosity, "DEBUG")
    folder = config.work_dir / "nipype_config"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nipype.cfg").write_text(
            "[logging]\n" + "".join(f"{key} = {level}\n" for key in ("workflow_level", "interface_level", "utils_level"))
            + "[execution]\ncheck_version = false\n")
    except OSError as err:
        LOGGER.warning("cannot write %s: %s", folder / "nipype.cfg", err)
        return
    os.environ["NIPYPE_CONFIG_DIR"] = str(folder)


def process(config, report, source_description: dict, early_messages) -> int:
    """Everything after the checks: output folders, dataset files, workflow, summary."""
    from ..utils.dataset import write_dataset_files
    from ..utils.paths import make_folder
    from ..utils.run_lock import lock_folder
    from ..workflows.base import init_grazbids_wf
    from .execute import configure_threads, run_workflow

    log_handler = None
    locks = []
    saved_environ = {key: os.environ.get(key) for key in (LOG_FILE_ENV, "NIPYPE_CONFIG_DIR")}
    try:
        make_folder(config.work_dir, "work folder")
        note_work_dir(config.work_dir)
        # a second run on the same work folder (or group outputs) stops here, before writing
        locks.append(lock_folder(config.work_dir, "the work folder"))
        make_folder(config.output_dir, "output_dir")
        if config.is_group_level:
            locks.append(lock_folder(make_folder(config.log_dir, "log folder"), "the group outputs of",
                                     lock_name="grazbids_group.lock"))
        write_dataset_files(config, source_description)
        log_handler = add_log_file(config.log_dir, config.analysis_level, report.stamp, early_messages)
        configure_threads(config.omp_nthreads)
        route_nipype_logging(config.verbosity)
        configure_worker_nipype(config)
        report.processed = sorted(config.t1w_files)
        try:
            workflow = init_grazbids_wf(config)
        except Exception as err:  # e.g. a pipeline module missing or rejecting the settings
            LOGGER.exception("cannot build the workflow: %s", err)
            report.run_error = f"cannot build the workflow: {err}"
            report.failed["workflow"] = {"nodes": [], "crashfiles": [], "not_run": report.run_error}
        else:
            with stdout_to_stderr():
                run_workflow(workflow, config, report)
        report.finished = datetime.now().isoformat(timespec="seconds")
        code = report.final_exit_code()
        report.exit_code = int(code)
        report.log()
        try:
            LOGGER.info("Run summary: %s", report.write(config.log_dir))
        except OSError as err:
            LOGGER.error("cannot write the run summary into %s: %s", config.log_dir, err)
            code = ExitCode.IO_ERROR if code == ExitCode.OK else code
        return int(code)
    finally:
        for lock in locks:
            lock.release()
        for key, value in saved_environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        logging.getLogger().removeHandler(early_messages)
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()


def main(argv: list[str] | None = None, adjust=None) -> int:
    try:
        return execute(argv, adjust)
    except GrazbidsError as err:
        if not any(getattr(h, "_grazbids", False) for h in logging.getLogger().handlers):
            setup_logging(0)  # stopped while parsing the command line
        LOGGER.error("%s", err.message)
        return int(err.code)
    except SystemExit as exc:  # argparse: --help/--version (0) and usage errors (64)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    except KeyboardInterrupt as err:  # before the workflow ran (or Interrupted from SIGTERM)
        LOGGER.error("interrupted%s", f" by {err.name}" if hasattr(err, "name") else "")
        return getattr(err, "exit_code", ExitCode.INTERRUPTED)
    except OSError as err:
        LOGGER.exception("I/O error: %s", err)
        return int(ExitCode.IO_ERROR)
    except Exception as err:  # a bug, or a missing pipeline module: say so, exit 1
        LOGGER.exception("grazbids failed unexpectedly: %s", err)
        return int(ExitCode.FAILURE)


if __name__ == "__main__":
    sys.exit(main())
