"""The participant level on a real one-node SLURM cluster, through Nipype's SLURM plugin.

The fixture starts munged, slurmctld and slurmd with private sockets, ports, spool and log
folders in a temp dir (nothing under /etc is changed), waits until ``sinfo`` shows the node
idle, and stops the daemons it started afterwards. Needs root and the Debian packages
``slurm-wlm munge`` (``apt-get install -y slurm-wlm munge``); skipped with the reason
otherwise. Two tiny participants run with ``--plugin-config`` made from workflows/slurm.yml
(only ``sbatch_args`` is shrunk to fit the test node): every Nipype node becomes an sbatch
job. One test uses a stand-in participant workflow (fast: checks the SLURM plumbing and
failure attribution), one the real registration workflow.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cli_helpers import install_fakes, make_bids, restore_thread_settings  # noqa: F401 (autouse)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLURM_YML = REPO / "workflows" / "slurm.yml"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
APT_HINT = "apt-get install -y slurm-wlm munge"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/sbin") if (Path(d) / name).exists()), None)


class Cluster:
    """A one-node SLURM cluster in ``root``; ``env`` holds SLURM_CONF for client commands."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("munge/*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        socket_path = munge / "munge.socket"
        # munged as user munge (it refuses root), on a private socket and key
        self._spawn(["runuser", "-u", "munge", "--", _which("munged"), "--foreground", "--force",
                     f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={munge / 'munged.pid'}",
                     f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        self._wait(lambda: socket_path.exists(), "munged socket")
        os.chmod(munge, 0o755)  # slurm (root) must reach the socket

        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        cpus = os.cpu_count() or 1
        memory = max(1024, _memory_mb() - 2048)
        self.conf.write_text("\n".join([
            "ClusterName=grazbidstest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(lambda: self.node_state() == "idle", "the node to be idle in sinfo", timeout=60)

    def node_state(self) -> str:
        done = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=self.env, capture_output=True,
                              text=True, timeout=20)
        return done.stdout.strip()

    def _spawn(self, argv: list[str]) -> None:
        self.processes.append(subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def _wait(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited ({process.returncode}) while waiting "
                                       f"for {what}\n{self.log_tail()}")
            if condition():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}\n{self.log_tail()}")

    def stop(self) -> None:
        # cancel leftover jobs, then stop the daemons we started (by pid, newest first)
        if self.conf.exists() and len(self.processes) > 1:
            try:
                subprocess.run([_which("scancel") or "scancel", "--user=root"], env=self.env,
                               capture_output=True, timeout=20, check=False)
            except subprocess.TimeoutExpired:
                pass
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = [name for name in DAEMONS if _which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): {APT_HINT}")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    try:
        import pwd
        pwd.getpwnam("munge")
    except KeyError:
        pytest.skip(f"no 'munge' user (the munge package creates it): {APT_HINT}")
    # not under pytest's tmp folder: that is private to root, and munged runs as 'munge'
    root = Path(tempfile.mkdtemp(prefix="grazbids-slurm-"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"a one-node SLURM cluster could not start here: {err}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def slurm_env(slurm_cluster, monkeypatch):
    """Client commands (sbatch/squeue, run by Nipype) find the test cluster's config."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    if not os.environ.get("LOGNAME"):  # Nipype's SLURM plugin names jobs after $LOGNAME
        monkeypatch.setenv("LOGNAME", "root")
    return slurm_cluster


def plugin_file(tmp_path: Path) -> Path:
    """workflows/slurm.yml with sbatch_args that fit the one test node."""
    content = yaml.safe_load(SLURM_YML.read_text())
    assert content["plugin"] == "SLURM" and "sbatch_args" in content["plugin_args"]
    content["plugin_args"]["sbatch_args"] = "--time=00:20:00 --mem=2G --cpus-per-task=1"
    path = tmp_path / "slurm.yml"
    path.write_text(yaml.safe_dump(content))
    return path


def _jobs_ran(work: Path) -> list[Path]:
    return sorted(work.rglob("batchscript_*.sh"))


def test_sinfo_shows_the_node_idle(slurm_cluster):
    assert slurm_cluster.node_state() == "idle"


def test_participant_level_on_slurm_stand_in_workflow(slurm_env, tmp_path, monkeypatch):
    """Two participants, one of which fails: the SLURM jobs run, and the failure is reported
    for the right participant (exit 1) while the other one finishes."""
    from grazbids.cli.run import main

    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    out, work = tmp_path / "out", tmp_path / "work"
    install_fakes(monkeypatch, fail_for=("02",))
    code = main([str(bids), str(out), "participant", "--skip-bids-validation", "-w", str(work),
                 "--plugin-config", str(plugin_file(tmp_path)), "--omp-nthreads", "1"])
    assert code == 1
    assert (out / "sub-01" / "anat" / "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz").is_file()
    summary = json.loads(sorted((out / "logs").glob("*.json"))[-1].read_text())
    assert set(summary["failed"]) == {"sub-02"}, summary["failed"]
    assert _jobs_ran(work), "no sbatch job scripts: the SLURM plugin did not submit anything"
    assert list(work.rglob("slurm-*.out")), "no SLURM job output files"


def test_participant_level_on_slurm_real_workflow(slurm_env, tmp_path, real_bids_dir):
    """The real participant workflow (registration, masks) for two tiny participants."""
    pytest.importorskip("grazbids.workflows.participant",
                        reason="grazbids/workflows/participant.py is not there yet")
    import nibabel as nib
    import numpy as np
    from nilearn.image import resample_img

    from grazbids.cli.run import main

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "ds002748 tiny copy", "BIDSVersion": "1.10.0", "License": "CC0"}))
    (bids / "participants.tsv").write_text("participant_id\nsub-01\nsub-03\n")
    for sub in ("sub-01", "sub-03"):
        img = nib.load(real_bids_dir / sub / "anat" / f"{sub}_T1w.nii.gz")
        zooms = img.header.get_zooms()[:3]
        small = resample_img(img, target_affine=img.affine[:3, :3] @ np.diag([3 / z for z in zooms]),
                             interpolation="continuous", force_resample=True, copy_header=True)
        (bids / sub / "anat").mkdir(parents=True)
        nib.Nifti1Image(np.clip(small.get_fdata(), 0, None).astype(np.int16), small.affine).to_filename(
            bids / sub / "anat" / f"{sub}_T1w.nii.gz")
    out, work = tmp_path / "out", tmp_path / "work"
    code = main([str(bids), str(out), "participant", "--skip-bids-validation", "-w", str(work),
                 "--plugin-config", str(plugin_file(tmp_path)), "--omp-nthreads", "1"])
    assert code == 0, sorted(p.name for p in (out / "logs").glob("*"))
    for sub in ("sub-01", "sub-03"):
        anat = out / sub / "anat"
        assert (anat / f"{sub}_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz").is_file()
        assert (anat / f"{sub}_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz").is_file()
    assert _jobs_ran(work)


def _fake_apptainer(folder: Path) -> Path:
    """An `apptainer` that records its arguments (one file per SLURM job/array task)."""
    folder.mkdir()
    calls = folder / "calls"
    calls.mkdir()
    script = folder / "apptainer"
    script.write_text("#!/bin/bash\n"
                      f'printf "%s\\n" "$@" > "{calls}/${{SLURM_ARRAY_TASK_ID:-$SLURM_JOB_ID}}.args"\n'
                      f'env | grep -E "^(APPTAINERENV|SINGULARITYENV)_" > "{calls}/${{SLURM_ARRAY_TASK_ID:-$SLURM_JOB_ID}}.env" || true\n')
    script.chmod(0o755)
    return calls


def _sbatch(cluster, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_which("sbatch"), "--wait", *args], env={**cluster.env, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_apptainer_array_script_runs_one_participant_per_task(slurm_cluster, tmp_path):
    """singularity/slurm_participant_array.sh on the test cluster, with a stand-in apptainer:
    each array task runs exactly its participants.tsv row, with the binds and thread counts."""
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "07"))
    calls = _fake_apptainer(tmp_path / "bin")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "BIDS_DIR": str(bids),
           "OUT_DIR": str(tmp_path / "out"), "SIF": "/images/grazbids.sif",
           "WORK_ROOT": str(tmp_path / "work"), "TEMPLATEFLOW_DIR": str(tmp_path / "tf")}
    done = _sbatch(slurm_cluster, ["--array=1-3", "--cpus-per-task=1", "--mem=500M",
                                   str(REPO / "singularity" / "slurm_participant_array.sh"), "--verbose"],
                   env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr + slurm_cluster.log_tail()
    for task, label in ((1, "01"), (2, "02"), (3, "07")):
        args = (calls / f"{task}.args").read_text().split("\n")
        assert args[:2] == ["run", "--cleanenv"]
        assert f"{bids}:/bids:ro" in args and f"{tmp_path / 'tf'}:/templateflow:ro" in args
        assert f"{tmp_path / 'work'}/grazbids_work/sub-{label}:/work" in args
        tail = args[args.index("/images/grazbids.sif") + 1:]
        assert tail[:5] == ["/bids", "/out", "participant", "--participant-label", label]
        assert "--skip-bids-validation" in tail and tail[-2] == "--verbose"
        assert tail[tail.index("--nprocs") + 1] == "1" and tail[tail.index("--mem-gb") + 1] == "0.5"
        assert "APPTAINERENV_TEMPLATEFLOW_HOME=/templateflow" in (calls / f"{task}.env").read_text()


def test_apptainer_group_script(slurm_cluster, tmp_path):
    """singularity/slurm_group_gpu.sh (GPU request dropped: the test node has none)."""
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    calls = _fake_apptainer(tmp_path / "bin")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "BIDS_DIR": str(bids),
           "OUT_DIR": str(tmp_path / "out"), "SIF": "/images/grazbids-cuda.sif", "TARGET_COLUMN": "group",
           "WORK_DIR": str(tmp_path / "work")}
    script = tmp_path / "group.sh"
    script.write_text(re.sub(r"(?m)^#SBATCH --(partition|gres)=.*\n", "",
                             (REPO / "singularity" / "slurm_group_gpu.sh").read_text()))
    done = _sbatch(slurm_cluster, ["--cpus-per-task=1", "--mem=500M", str(script), "--epochs", "3"], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr + slurm_cluster.log_tail()
    args = next(calls.glob("*.args")).read_text().split("\n")
    assert args[:3] == ["run", "--nv", "--cleanenv"]
    tail = args[args.index("/images/grazbids-cuda.sif") + 1:]
    assert tail[:5] == ["/bids", "/out", "group", "--target-column", "group"]
    assert "--device" in tail and tail[tail.index("--device") + 1] == "cuda"
    assert tail[-3:-1] == ["--epochs", "3"]
