"""A run under adverse conditions: signals, a second run at once, missing outputs, old
crash files, worker messages. Signal and stdout tests run grazbids (with the stand-in
workflows of cli_helpers) in a process of its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import install_fakes, make_bids, restore_thread_settings  # noqa: F401
from grazbids.cli.run import main
from grazbids.exitcodes import ExitCode

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("run_with_fakes.py")
FAST = ["--skip-bids-validation", "--plugin", "Linear"]


def _summary(out) -> dict:
    return json.loads(sorted((out / "logs").glob("*_summary.json"))[-1].read_text())


def _start(args, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRAZBIDS_FAKE_SLEEP": str(sleep)}
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _descendants(pid: int) -> list[int]:
    from grazbids.cli.interrupt import descendants

    return descendants(pid)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# ------------------------------------------------------------------ signals and a second run
@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, ExitCode.TERMINATED), (signal.SIGINT, ExitCode.INTERRUPTED)])
def test_signal_stops_workers_and_writes_the_summary(tmp_path, signum, code):
    bids = make_bids(tmp_path / "bids")
    out, work = tmp_path / "out", tmp_path / "work"
    # MultiProc with forkserver workers, as in production; every "registration" takes 120 s
    proc = _start([bids, out, "participant", "--skip-bids-validation", "--nprocs", "2", "-w", work], sleep=120)
    try:
        _wait_for(lambda: len(_descendants(proc.pid)) >= 2 and list((work / "grazbids_wf").glob("sub_*_wf/preprocess")))
        time.sleep(1.0)  # the workers have started their nodes
        workers = _descendants(proc.pid)

        # a second identical run meanwhile: refused, names the first one, writes nothing
        second_out = tmp_path / "out2"
        assert main([str(bids), str(second_out), "participant", *FAST, "-w", str(work)]) == ExitCode.BUSY
        assert not second_out.exists()

        started = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert time.monotonic() - started < 30  # bounded: the workers' 120 s nodes were not waited for
    name = signal.Signals(signum).name
    assert f"{name} received: stopping the running steps" in err
    assert f"INTERRUPTED by {name}" in err
    summary = _summary(out)
    assert summary["interrupted"] == name and summary["exit_code"] == code
    assert sorted(summary["failed"]) == ["sub-01", "sub-02", "sub-03"]
    assert all("interrupted" in info["not_run"] for info in summary["failed"].values())
    _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=10)  # no orphans left


def test_second_run_is_refused_while_the_lock_is_held(tmp_path, monkeypatch, capsys):
    from grazbids.utils.run_lock import lock_folder

    install_fakes(monkeypatch)
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04"), targets={"dx": ["a", "b", "a", "b"]})
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    held = lock_folder(work, "the work folder")
    assert main([str(bids), str(out), "participant", *FAST, "-w", str(work)]) == ExitCode.BUSY
    err = capsys.readouterr().err
    assert f"the work folder {work} is in use by another grazbids run (host " in err and f"pid {os.getpid()}" in err
    assert not out.exists()
    held.release()
    assert main([str(bids), str(out), "participant", *FAST, "-w", str(work)]) == ExitCode.OK

    # group level: the group outputs are locked too, even with another work folder
    held = lock_folder(out / "logs", "the group outputs of", lock_name="grazbids_group.lock")
    code = main([str(bids), str(out), "group", "--target-column", "dx", "--cv-folds", "2", *FAST,
                 "-w", str(tmp_path / "work2")])
    assert code == ExitCode.BUSY and f"the group outputs of {out / 'logs'} is in use" in capsys.readouterr().err
    held.release()


def test_stdout_stays_empty_with_worker_processes(tmp_path):
    """Nipype's logger prints to stdout in every worker process; -v makes it talk."""
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    proc = _start([bids, tmp_path / "out", "participant", "--skip-bids-validation", "--nprocs", "2", "-v",
                   "-w", tmp_path / "work"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out == ""
    assert "[Node]" in err  # the workers' node messages, now on stderr


# ------------------------------------------------------------------ honest summaries
def test_missing_expected_output_means_not_succeeded(tmp_path, monkeypatch, capsys):
    from grazbids.workflows import expected

    install_fakes(monkeypatch)
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    # sub-01's (fake) workflow writes its preprocessed T1w, not the native WM probseg
    lost = anat / "sub-01_label-WM_probseg.nii.gz"
    monkeypatch.setattr(expected, "expected_derivatives", lambda wf: (
        [anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz", lost]
        if wf.name == "sub_01_wf" else []))
    code = main([str(bids), str(out), "participant", *FAST, "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert "1 of 2 processed participant(s) succeeded" in err
    assert f"sub-01: ran, but expected output(s) are missing; 1 expected output(s) missing: {lost}" in err
    summary = _summary(out)
    assert list(summary["failed"]) == ["sub-01"] and summary["failed"]["sub-01"]["missing_outputs"] == [str(lost)]


def test_expected_derivatives_of_the_real_participant_workflow():
    from grazbids.workflows.expected import expected_derivatives
    from grazbids.workflows.participant import init_participant_wf

    t1w = [f"/b/sub-01/ses-{s}/anat/sub-01_ses-{s}_T1w.nii.gz" for s in (1, 2)]
    wf = init_participant_wf(subject="01", t1w_files=t1w, bids_dir="/b", output_dir="/o", template="MNI152NLin2009aSym",
                             resolution=2, registration="affine", omp_nthreads=1, seed=1, name="sub_01_wf",
                             skull_strip="skip")  # "auto" reads the (here fictitious) image to decide
    files = {str(p) for p in expected_derivatives(wf)}
    assert len(files) == 2 * 2 * 13  # per T1w: 13 derivatives (dseg included), each with its sidecar
    for session in (1, 2):
        stem = f"/o/sub-01/ses-{session}/anat/sub-01_ses-{session}"
        assert {f"{stem}_label-WM_probseg.nii.gz", f"{stem}_label-CSF_probseg.json", f"{stem}_dseg.nii.gz",
                f"{stem}_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz",
                f"{stem}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"} <= files


def test_failures_are_attributed_by_hierarchy_or_folder():
    from types import SimpleNamespace

    from grazbids.cli.execute import NodeTracker

    def node(fullname, hierarchy=None, base_dir=None):
        return SimpleNamespace(fullname=fullname, _hierarchy=hierarchy, base_dir=base_dir)

    assert NodeTracker.owner(node("grazbids_wf.sub_01_wf.anat_wf.register")) == "sub-01"
    assert NodeTracker.owner(node("_probsegs_to_native1", base_dir="/w/grazbids_wf/sub_02_wf/anat_wf")) == "sub-02"
    assert NodeTracker.owner(node("_ds2", hierarchy="grazbids_wf.group_wf")) == "group"
    assert NodeTracker.owner(node("preprocessing_done")) == "workflow"


def test_old_crash_files_leave_once_the_participant_succeeds(tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    out, work = tmp_path / "out", tmp_path / "work"
    install_fakes(monkeypatch, fail_for=("02",))
    assert main([str(bids), str(out), "participant", *FAST, "-w", str(work)]) == ExitCode.FAILURE
    crash = Path(_summary(out)["failed"]["sub-02"]["crashfiles"][0])
    assert crash.parent == out / "sub-02" / "log"
    capsys.readouterr()

    install_fakes(monkeypatch)  # the problem is fixed; the same command again
    assert main([str(bids), str(out), "participant", *FAST, "-w", str(work)]) == ExitCode.OK
    assert not (out / "sub-02" / "log").exists()
    assert (work / "resolved_crashfiles" / "sub-02" / crash.name).exists()
    assert "sub-02: succeeded now; moved 1 crash file(s) of an earlier run" in capsys.readouterr().err


def test_worker_process_logging_reaches_stderr_and_the_log_file(tmp_path):
    log_file = tmp_path / "run.log"
    code = ("import logging; from grazbids.utils.process_logging import ensure_process_logging; "
            "ensure_process_logging(); logging.getLogger('grazbids.engine').info('fold 1: resuming after epoch 3')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "GRAZBIDS_LOG_FILE": str(log_file)})
    assert "INFO    grazbids.engine: fold 1: resuming after epoch 3" in proc.stderr
    assert "fold 1: resuming after epoch 3" in log_file.read_text()
