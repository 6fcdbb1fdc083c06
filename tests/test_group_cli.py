"""The group level through the command line, single-process and under torchrun: the same
program, the same outputs (tests/data/expected_outputs_group.txt)."""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from cli_helpers import make_bids
from grazbids.cli.run import main

TPL, RES = "MNI152NLin2009aSym", 2
EXPECTED = Path(__file__).parent / "data" / "expected_outputs_group.txt"
SHAPE = (16, 16, 16)


def group_cohort(tmp_path: Path, n: int = 8) -> tuple[Path, Path, Path]:
    """A raw dataset plus participant-level outputs (tiny template-space images with a
    class-dependent bright cube), and a two-region atlas on their grid."""
    labels = ["m" if i % 2 else "f" for i in range(n)]
    subjects = [f"{i:02d}" for i in range(n)]
    bids = make_bids(tmp_path / "bids", subjects=subjects, targets={"gender": labels})
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    mask = np.zeros(SHAPE, np.float32)
    mask[4:12, 4:12, 4:12] = 1
    for label, cls in zip(subjects, labels):
        image = mask * rng.uniform(300, 500, SHAPE)
        if cls == "m":
            image[7:10, 7:10, 7:10] = 900
        anat = out / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        stem = f"sub-{label}_space-{TPL}_res-{RES}"
        nb.save(nb.Nifti1Image(image.astype(np.float32), np.eye(4)), str(anat / f"{stem}_desc-preproc_T1w.nii.gz"))
        nb.save(nb.Nifti1Image(mask.astype(np.uint8), np.eye(4)), str(anat / f"{stem}_desc-brain_mask.nii.gz"))
    regions = np.zeros(SHAPE, np.int16)
    regions[4:8], regions[8:12] = 1, 2
    atlas = tmp_path / "atlas_dseg.nii.gz"
    nb.save(nb.Nifti1Image(regions, np.eye(4)), str(atlas))
    (tmp_path / "atlas_dseg.tsv").write_text("index\tname\n1\tleft\n2\tright\n")
    return bids, out, atlas


def group_options(atlas: Path, work: Path) -> list[str]:
    return ["--target-column", "gender", "--cv-folds", "2", "--epochs", "1", "--device", "cpu",
            "--learning-rate", "1e-3", "--mode", "plain", "grazplus", "--explain", "gradient",
            "--atlas", str(atlas), "--skip-bids-validation", "-w", str(work)]


def group_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "group").rglob("*") if p.is_file())


def expected_files() -> list[str]:
    return [line for line in EXPECTED.read_text().splitlines() if line and not line.startswith("#")]


def test_group_level_writes_the_expected_outputs(tmp_path):
    bids, out, atlas = group_cohort(tmp_path)
    assert main([str(bids), str(out), "group", *group_options(atlas, tmp_path / "work"), "--plugin", "Linear"]) == 0
    assert group_files(out) == expected_files()
    cv = pd.read_csv(out / "group" / "mode-grazplus" / "cv_metrics.tsv", sep="\t")
    assert len(cv) == 2 and cv["balanced_accuracy"].between(0, 1).all()


def test_torchrun_is_the_same_program_as_the_group_level(tmp_path):
    """2 processes (gloo) with every option above: the same files, exit code and summary."""
    bids, out, atlas = group_cohort(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "grazbids.group.torchrun", str(bids), str(out), *group_options(atlas, tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert group_files(out) == expected_files()
    assert len(list((out / "logs").glob("grazbids_group_*_summary.json"))) == 1  # rank 0's run summary
    assert "Traceback" not in proc.stderr


def test_torchrun_entry_refuses_missing_preprocessing(tmp_path, monkeypatch):
    """Preprocessing would run on rank 0 alone while the other ranks train: refused (65)."""
    from grazbids.group import torchrun

    bids, out, atlas = group_cohort(tmp_path, n=4)
    for path in (out / "sub-03").rglob("*desc-preproc_T1w.nii.gz"):
        path.unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torchrun, "_init_distributed", lambda device: None)
    assert torchrun.main([str(bids), str(out), *group_options(atlas, tmp_path / "work")]) == 65


def test_group_argv_accepts_the_group_word_or_not():
    from grazbids.group.torchrun import group_argv

    assert group_argv(["b", "o", "--epochs", "1"]) == ["b", "o", "group", "--epochs", "1"]
    assert group_argv(["b", "o", "group", "--epochs", "1"]) == ["b", "o", "group", "--epochs", "1"]
    assert group_argv(["--help"]) == ["--help"]
