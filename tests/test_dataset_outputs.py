"""Dataset-level derivative files, and the derivatives folder as a whole: valid BIDS
(bids-validator-deno) and indexable by pybids."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cli_helpers import install_fakes, make_bids, restore_thread_settings  # noqa: F401
from grazbids import __version__
from grazbids.cli.parser import parse_args
from grazbids.cli.run import main
from grazbids.utils.bids_validator import find_validator, run_validator
from grazbids.utils.dataset import (BIDSIGNORE_PATTERNS, citation_text, dataset_description,
                                    detect_container, raw_dataset_link, write_dataset_files,
                                    write_text_atomic)

CONTAINER_VARS = ("GRAZBIDS_CONTAINER_TYPE", "GRAZBIDS_CONTAINER_TAG", "APPTAINER_CONTAINER",
                  "SINGULARITY_CONTAINER")


@pytest.fixture
def no_container_env(monkeypatch):
    for var in CONTAINER_VARS:
        monkeypatch.delenv(var, raising=False)


def _config(tmp_path, *extra, out=None):
    out = out or tmp_path / "out"
    return parse_args([str(tmp_path / "bids"), str(out), *extra])


# ------------------------------------------------------------------ dataset_description.json
def test_description_fields(tmp_path, no_container_env):
    config = _config(tmp_path, "participant")
    source = {"Name": "Study X", "BIDSVersion": "1.8.0", "DatasetDOI": "10.18112/openneuro.ds000001.v1.0.0"}
    description = dataset_description(config, source)
    assert description["DatasetType"] == "derivative"
    assert description["Name"] == "grazbids derivatives of Study X"
    assert description["GeneratedBy"][0]["Name"] == "grazbids"
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert description["SourceDatasets"] == [{"URL": (tmp_path / "bids").as_uri(),
                                               "DOI": "doi:10.18112/openneuro.ds000001.v1.0.0"}]
    assert description["DatasetLinks"] == {"raw": (tmp_path / "bids").as_uri()}


def test_raw_link_is_relative_inside_the_dataset(tmp_path):
    bids = tmp_path / "bids"
    assert raw_dataset_link(bids, bids / "derivatives" / "grazbids") == "../../"
    assert raw_dataset_link(bids, tmp_path / "elsewhere") == bids.as_uri()


@pytest.mark.parametrize("env,files,expected", [
    ({}, [], None),
    ({}, [".dockerenv"], {"Type": "docker"}),
    ({"GRAZBIDS_CONTAINER_TYPE": "docker", "GRAZBIDS_CONTAINER_TAG": "grazbids/grazbids:0.1.0"}, [],
     {"Type": "docker", "Tag": "grazbids/grazbids:0.1.0"}),
    # a Docker image converted to .sif still carries the Dockerfile's variables
    ({"GRAZBIDS_CONTAINER_TYPE": "docker", "APPTAINER_CONTAINER": "/images/grazbids_0.1.0.sif"}, [],
     {"Type": "singularity", "Tag": "grazbids_0.1.0.sif"}),
    ({}, ["singularity"], {"Type": "singularity"}),
])
def test_container_detection(tmp_path, monkeypatch, no_container_env, env, files, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name in files:
        (tmp_path / name).touch()
    assert detect_container(root=tmp_path) == expected


def test_container_in_description(tmp_path, monkeypatch, no_container_env):
    monkeypatch.setenv("GRAZBIDS_CONTAINER_TYPE", "docker")
    monkeypatch.setenv("GRAZBIDS_CONTAINER_TAG", "grazbids:test")
    description = dataset_description(_config(tmp_path, "participant"), {})
    assert description["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "grazbids:test"}
    assert description["Name"] == "grazbids derivatives"


# ------------------------------------------------------------------ .bidsignore, citation, atomicity
def test_bidsignore_keeps_user_lines(tmp_path):
    config = _config(tmp_path, "participant")
    config.output_dir.mkdir()
    (config.output_dir / ".bidsignore").write_text("extra/\n*_heatmap.*\n")
    write_dataset_files(config, {})
    lines = (config.output_dir / ".bidsignore").read_text().splitlines()
    assert lines[0] == "extra/" and lines.count("*_heatmap.*") == 1
    assert set(BIDSIGNORE_PATTERNS) <= set(lines)


def test_files_are_written_atomically_with_normal_permissions(tmp_path):
    config = _config(tmp_path, "participant")
    written = write_dataset_files(config, {"Name": "x"})
    assert [p.name for p in written] == ["dataset_description.json", ".bidsignore", "CITATION.md"]
    leftovers = [p for p in config.output_dir.rglob(".*.tmp")]
    assert leftovers == []
    mode = stat.S_IMODE(os.stat(written[0]).st_mode)
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH  # not mkstemp's private 0600


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_citation_participant_level(tmp_path):
    text = citation_text(_config(tmp_path, "participant", "--registration", "nonlinear", "--resolution", "1"))
    assert f"grazbids* {__version__}" in text
    assert "MNI152" in text and "1 mm grid" in text and "SyN" in text
    assert "antspyx" in text and "Nipype" in text and "TemplateFlow" in text
    assert "doi:10.1038/s41598-022-24541-7" in text
    assert "cross-validation" not in text


def test_citation_group_level(tmp_path):
    text = citation_text(_config(tmp_path, "group", "--target-column", "dx", "--mode", "plain", "grazplus",
                                 "--cv-folds", "3", "--epochs", "7"))
    assert "`dx`" in text and "3-fold cross-validation" in text and "7 epochs" in text
    assert "Graz+ relevance-guided training" in text and "plain CNN" in text


# ------------------------------------------------------------------ the whole derivatives folder
@pytest.fixture
def derivatives(tmp_path, monkeypatch):
    """A finished participant run (fake preprocessing with sidecars), plus files the
    other pipelines write that BIDS has no names for."""
    install_fakes(monkeypatch, fail_for=("02",))
    bids = make_bids(tmp_path / "bids", targets={"dx": ["a", "b", "a"]}, doi="10.0000/test.1")
    out = bids / "derivatives" / "grazbids"
    code = main([str(bids), str(out), "participant", "--skip-bids-validation", "--plugin", "Linear",
                 "-w", str(tmp_path / "work")])
    assert code == 1  # sub-02 failed on purpose: its crash file must not break validity
    anat = out / "sub-01" / "anat"
    (anat / "sub-01_space-MNI152NLin2009aSym_res-2_desc-grazplus_heatmap.nii.gz").write_bytes(b"x")
    (anat / "sub-01_desc-grazplus_predictions.tsv").write_text("participant_id\tprob\nsub-01\t0.9\n")
    (anat / "sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat").write_bytes(b"x")
    (out / "group" / "models").mkdir(parents=True)
    (out / "group" / "models" / "model_card.json").write_text("{}")
    (out / "figures").mkdir()
    (out / "sub-01.html").write_text("<html></html>")
    return bids, out


@pytest.mark.skipif(find_validator() is None, reason="bids-validator-deno not installed")
def test_derivatives_validate(derivatives):
    _, out = derivatives
    assert (out / "sub-02" / "log").is_dir()
    report = run_validator(out)
    assert report.errors == [], [report.describe(issue) for issue in report.errors]


def test_derivatives_are_indexed_by_pybids(derivatives):
    from bids import BIDSLayout

    bids, out = derivatives
    layout = BIDSLayout(out, validate=False)
    assert layout.get(subject="01", desc="preproc", suffix="T1w", extension=".nii.gz")
    combined = BIDSLayout(bids, derivatives=out)
    masks = combined.get(scope="grazbids", space="MNI152NLin2009aSym", desc="brain", suffix="mask",
                         extension=".nii.gz", return_type="filename")
    assert [Path(m).name for m in masks] == [
        "sub-01_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz",
        "sub-03_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz"]
    preproc = combined.get(scope="grazbids", subject="01", desc="preproc", suffix="T1w", extension=".nii.gz")[0]
    sources = preproc.get_metadata()["Sources"]
    assert sources == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    # bids:raw: resolves through DatasetLinks
    raw = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]["raw"]
    assert (out / raw / sources[0].removeprefix("bids:raw:")).resolve() == (bids / "sub-01/anat/sub-01_T1w.nii.gz")
