"""A whole simulated cohort: plan, register sources, simulate, write, rename into place.

The dataset is built in a hidden temporary folder beside the output folder and renamed
onto it at the end, so an interrupted run leaves no half-written dataset. Participants
run in `nprocs` worker processes (forkserver); every participant's result depends only
on the seed and its index, so the output is byte-identical for any `nprocs`.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import nibabel as nb
import numpy as np

from ..exitcodes import ExitCode, GrazbidsError
from ..templates import TemplateFiles, get_template
from .anatomy import (TEMPLATE_SOURCE, SourceAnatomy, UnusableAnatomyError, check_anatomy_header,
                      find_anatomy_files, register_to_template, scan_source, template_source)
from .config import ConfigError, SimulationConfig
from .confounds import assign_confound
from .deformation import Grid
from .layout import participant_row, write_dataset_files, write_participant
from .participant import ParticipantPlan, simulate_participant

LOGGER = logging.getLogger("grazbids.simulate")
_COHORT_STREAM = 7919  # seeds the class/confound/order assignment, apart from participants


@dataclass(frozen=True)
class CohortResult:
    output_dir: Path
    plans: list[ParticipantPlan]
    seconds: float


# --------------------------------------------------------------------------- planning
def plan_cohort(config: SimulationConfig, sources: list[str]) -> list[ParticipantPlan]:
    """Diagnoses, confound flags and splits (balanced classes: patients = n // 2), in a
    seeded random order, labelled 001, 002, ...; sources are cycled through."""
    rng = np.random.default_rng([config.seed, _COHORT_STREAM])
    entries = []
    for split, n, correlation in (("train", config.n_train, config.shortcut_correlation),
                                  ("test", config.n_test, config.test_correlation)):
        diagnoses = ["patient"] * (n // 2) + ["control"] * (n - n // 2)
        flags = (assign_confound(diagnoses, correlation, rng) if config.shortcut != "none"
                 else [False] * n)
        entries += [(split, d, f) for d, f in zip(diagnoses, flags)]
    order = rng.permutation(len(entries))
    width = max(3, len(str(len(entries))))
    return [ParticipantPlan(index=i, label=f"{i + 1:0{width}d}", diagnosis=entries[k][1],
                            shortcut=bool(entries[k][2]), split=entries[k][0],
                            source=sources[i % len(sources)])
            for i, k in enumerate(order)]


# --------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(config: SimulationConfig, template: TemplateFiles, root: str) -> None:
    """Per-process state: grids, the template source, a small cache of scan sources."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    template_img = nb.load(template.brain_mask)
    _WORKER.update(
        config=config, template=template, root=Path(root),
        grid=Grid.centred(config.fov_mm, config.voxel_size),
        template_grid=Grid(template_img.shape, template_img.affine),
        template_brain=np.asarray(template_img.dataobj) > 0,
        sources={},
    )


def _source(name: str, mni_to_source: np.ndarray | None) -> SourceAnatomy:
    cache: dict = _WORKER["sources"]
    if name not in cache:
        config = _WORKER["config"]
        if name == TEMPLATE_SOURCE:
            source = template_source(_WORKER["template"], config.voxel_size)
        else:
            source = scan_source(Path(name), mni_to_source, config.voxel_size)
            scans = [key for key in cache if key != TEMPLATE_SOURCE]
            if len(scans) >= 2:  # real scans are large: keep the last two
                cache.pop(scans[0])
        cache[name] = source
    return cache[name]


def _register_task(path: str) -> tuple[str, np.ndarray]:
    return path, register_to_template(Path(path), _WORKER["template"])


def _participant_task(plan: ParticipantPlan, mni_to_source: np.ndarray | None) -> dict:
    state = _WORKER
    scan = simulate_participant(plan, _source(plan.source, mni_to_source), state["config"],
                                state["grid"], state["template_grid"], state["template_brain"])
    write_participant(state["root"], plan, scan, state["grid"], state["template"],
                      state["config"])
    return participant_row(plan, scan)


class _InProcess:
    """The executor interface for nprocs == 1 (no worker processes)."""

    def __init__(self, *initargs):
        _init_worker(*initargs)

    def map(self, function, *iterables):
        return map(function, *iterables)

    def shutdown(self, **_):
        pass


def _progress(items, total: int, what: str):
    """tqdm on a terminal, one log line per item otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=what, unit="scan")
        return
    for done, item in enumerate(items, start=1):
        LOGGER.info("%s: %d/%d", what, done, total)
        yield item


# --------------------------------------------------------------------------- output folder
def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise GrazbidsError(ExitCode.USAGE, f"output {output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise GrazbidsError(ExitCode.USAGE, f"output folder {output_dir} is not empty; choose "
                                            "another folder or pass --overwrite")


def _publish(staging: Path, output_dir: Path) -> None:
    """Give the staging folder normal permissions and rename it onto `output_dir`."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, _ in os.walk(staging):
        os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes the top folder private
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / output_dir.name)
        os.replace(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output_dir)


# --------------------------------------------------------------------------- entry point
def simulate_cohort(config: SimulationConfig, output_dir: Path, *, overwrite: bool = False,
                    nprocs: int = 1, command: str = "grazbids-simulate") -> CohortResult:
    """Simulate and write the cohort; raises GrazbidsError with an exit code on bad input."""
    start = time.perf_counter()
    try:
        config.validate()
    except ConfigError as exc:
        raise GrazbidsError(ExitCode.USAGE, str(exc)) from None
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    scans = _anatomy_files(config)
    template = get_template(resolution=2)
    plans = plan_cohort(config, [str(p) for p in scans] or [TEMPLATE_SOURCE])
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.simulating-",
                                        dir=output_dir.parent))
    except OSError as exc:
        raise GrazbidsError(ExitCode.CANNOT_CREATE_OUTPUT,
                            f"cannot create {output_dir} ({exc})") from None
    LOGGER.info("simulating %d participants into %s (%d process(es))", len(plans), output_dir,
                nprocs)
    initargs = (config, template, str(staging))
    executor = (_InProcess(*initargs) if nprocs <= 1 else ProcessPoolExecutor(
        max_workers=nprocs, mp_context=get_context("forkserver"), initializer=_init_worker,
        initargs=initargs))
    try:
        affines = _register_sources(executor, sorted({p.source for p in plans} - {TEMPLATE_SOURCE}))
        order = sorted(plans, key=lambda p: (p.source, p.index))  # reuse cached sources
        results = executor.map(_participant_task, order, [affines.get(p.source) for p in order])
        rows = list(_progress(results, len(order), "participants"))
        rows.sort(key=lambda row: row["participant_id"])
        write_dataset_files(staging, config, plans, rows, command)
        _publish(staging, output_dir)
    except UnusableAnatomyError as exc:
        raise GrazbidsError(ExitCode.BAD_DATA, str(exc)) from None
    finally:
        executor.shutdown(cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    LOGGER.info("wrote %s: %d participants in %.1f s", output_dir, len(plans), seconds)
    return CohortResult(output_dir, plans, seconds)


def _anatomy_files(config: SimulationConfig) -> list[Path]:
    if not config.anatomy:
        return []
    try:
        scans = find_anatomy_files(list(config.anatomy))
    except FileNotFoundError as exc:
        raise GrazbidsError(ExitCode.MISSING_INPUT, str(exc)) from None
    try:
        for scan in scans:
            check_anatomy_header(scan)
    except UnusableAnatomyError as exc:
        raise GrazbidsError(ExitCode.BAD_DATA, str(exc)) from None
    return scans


def _register_sources(executor, scans: list[str]) -> dict[str, np.ndarray]:
    """One affine registration per source scan in use (this run's cache: the dict)."""
    if not scans:
        return {}
    LOGGER.info("registering %d source scan(s) to MNI152NLin2009aSym (affine, antspyx)",
                len(scans))
    return dict(_progress(executor.map(_register_task, scans), len(scans), "registrations"))
