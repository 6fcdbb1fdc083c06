"""Every kind of bad input, through the command line: its message, its exit code, and
that nothing half-written is left behind."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from cli_helpers import (brain_like_volume, install_fakes, make_bids, restore_thread_settings,  # noqa: F401
                         save_nifti, save_sheared, t1w_path, write_huge_header, write_model_card)
from grazbids.cli.run import main
from grazbids.exitcodes import ExitCode

FAST = ["--skip-bids-validation", "--plugin", "Linear"]


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    return make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04"),
                     targets={"dx": ["ad", "cn", "ad", "cn"]})


def run(tmp_path, bids, *args):
    """Run grazbids with its own output and work folders; return (code, out, work)."""
    out, work = tmp_path / "out", tmp_path / "work"
    return main([str(bids), str(out), *args, "-w", str(work)]), out, work


def assert_nothing_written(out, work):
    assert not out.exists(), sorted(out.rglob("*"))
    assert not work.exists()


def _summary(out) -> dict:
    return json.loads(sorted((out / "logs").glob("*_summary.json"))[-1].read_text())


# ------------------------------------------------------------------ the dataset itself
def test_not_a_bids_folder(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    code, out, work = run(tmp_path, tmp_path / "plain", "participant")
    assert code == ExitCode.MISSING_INPUT
    assert "not a BIDS dataset: dataset_description.json is missing" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_missing_bids_folder(tmp_path, capsys):
    code, out, work = run(tmp_path, tmp_path / "nowhere", "participant")
    assert code == ExitCode.MISSING_INPUT and "does not exist" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_broken_dataset_description(dataset, tmp_path, capsys):
    (dataset / "dataset_description.json").write_text("{broken")
    code, out, work = run(tmp_path, dataset, "participant", *FAST)
    assert code == ExitCode.BAD_DATA and "dataset_description.json is not valid JSON" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_unknown_participant(dataset, tmp_path, capsys):
    code, out, work = run(tmp_path, dataset, "participant", "--participant-label", "01", "sub-77", *FAST)
    assert code == ExitCode.MISSING_INPUT
    assert "participant(s) not found" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_path_characters_in_label(dataset, tmp_path, capsys):
    code, out, work = run(tmp_path, dataset, "participant", "--participant-label", "../etc", *FAST)
    assert code == ExitCode.USAGE and "invalid participant label '../etc'" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_requested_participant_without_t1w_is_skipped(dataset, tmp_path, capsys):
    t1w_path(dataset, "02").unlink()
    t1w_path(dataset, "02").with_suffix("").with_suffix(".json").unlink()
    (dataset / "sub-02" / "anat" / "sub-02_T2w.nii.gz").write_bytes(t1w_path(dataset, "01").read_bytes())
    code, out, _ = run(tmp_path, dataset, "participant", "--participant-label", "01", "02", *FAST)
    assert code == ExitCode.FAILURE  # named explicitly, so its absence is a failure
    assert "sub-02 has no T1w image" in capsys.readouterr().err
    assert list((out / "sub-01" / "anat").glob("*desc-preproc_T1w.nii.gz"))
    assert _summary(out)["without_t1w"] == ["02"]


def test_participant_without_t1w_among_all_is_only_a_warning(dataset, tmp_path):
    t1w_path(dataset, "04").unlink()
    code, out, _ = run(tmp_path, dataset, "participant", *FAST)
    assert code == ExitCode.OK
    assert _summary(out)["without_t1w"] == ["04"]


def test_no_t1w_left_exits_18(dataset, tmp_path, capsys):
    code, out, work = run(tmp_path, dataset, "participant", "--session-label", "followup", *FAST)
    assert code == ExitCode.NO_FILES and "no T1w images selected" in capsys.readouterr().err
    assert_nothing_written(out, work)


# ------------------------------------------------------------------ bad images
def _corrupt(kind: str, path):
    if kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a nifti file" * 10)
    elif kind == "2D":
        save_nifti(path, brain_like_volume(0)[:, :, 10])
    elif kind == "4D":
        save_nifti(path, np.stack([brain_like_volume(0)] * 3, axis=-1))
    elif kind == "NaN":
        data = brain_like_volume(0)
        data[5:8, 5:8, 5:8] = np.nan
        save_nifti(path, data)
    elif kind == "zeros":
        save_nifti(path, np.zeros((20, 20, 20), np.float32))
    elif kind == "voxels":
        save_nifti(path, brain_like_volume(0), zooms=(1.0, 1.0, 25.0))
    elif kind == "huge":
        write_huge_header(path, (20000, 20000, 20000))
    elif kind == "sheared":
        save_sheared(path, 0.2)


BAD_KINDS = {
    "truncated": "truncated or corrupt",
    "garbage": "not a readable NIfTI image",
    "2D": "is 2D",
    "4D": "is 4D",
    "NaN": "27 NaN",
    "zeros": "all voxels are zero",
    "voxels": "implausible voxel sizes",
    "huge": "declares 20000x20000x20000 voxels",
    "sheared": "sheared (non-orthogonal) voxel-to-world affine",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_image_excludes_only_that_participant(dataset, tmp_path, capsys, kind):
    bad = t1w_path(dataset, "02")
    _corrupt(kind, bad)
    code, out, _ = run(tmp_path, dataset, "participant", *FAST)
    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert f"sub-02 excluded: {bad}: " in err and BAD_KINDS[kind] in err
    assert f"EXCLUDED sub-02: {bad}" in err  # in the final summary too
    assert not (out / "sub-02").exists()
    for label in ("01", "03", "04"):
        assert list((out / f"sub-{label}" / "anat").glob("*desc-preproc_T1w.nii.gz"))
    summary = _summary(out)
    assert list(summary["excluded"]) == ["02"] and BAD_KINDS[kind] in summary["excluded"]["02"][0]
    assert summary["processed"] == ["01", "03", "04"]
    log_file = next((out / "logs").glob("grazbids_participant_*.log")).read_text()
    assert "sub-02 excluded" in log_file  # preflight messages reach the log file too


def test_all_bad_exits_65_and_writes_nothing(dataset, tmp_path, capsys):
    for label in ("01", "02", "03", "04"):
        _corrupt("zeros", t1w_path(dataset, label))
    code, out, work = run(tmp_path, dataset, "participant", *FAST)
    assert code == ExitCode.BAD_DATA
    assert "none of the 4 selected participant(s) has usable T1w data" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_singleton_4d_is_processed_with_a_warning(dataset, tmp_path, capsys):
    save_nifti(t1w_path(dataset, "03"), brain_like_volume(3)[..., None])
    code, _, _ = run(tmp_path, dataset, "participant", "--participant-label", "03", *FAST)
    assert code == ExitCode.OK
    assert "singleton 4th dimension" in capsys.readouterr().err


# ------------------------------------------------------------------ output problems
def test_output_dir_not_writable(dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    code = main([str(dataset), str(blocker / "out"), "participant", *FAST, "-w", str(tmp_path / "w")])
    assert code == ExitCode.CANNOT_CREATE_OUTPUT
    assert "cannot use output_dir" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0,
                    reason="root ignores folder permissions")
def test_output_dir_read_only(dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code = main([str(dataset), str(locked / "out"), "participant", *FAST, "-w", str(tmp_path / "w")])
    assert code == ExitCode.CANNOT_CREATE_OUTPUT


def test_work_dir_not_writable(dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main([str(dataset), str(tmp_path / "out"), "participant", *FAST, "-w", str(blocker / "w")])
    assert code == ExitCode.CANNOT_CREATE_OUTPUT and "work folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_of_another_pipeline_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]}))
    code, _, _ = run(tmp_path, dataset, "participant", *FAST)
    assert code == ExitCode.USAGE and "holds derivatives of fMRIPrep" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["dataset_description.json"]


# ------------------------------------------------------------------ group level
def test_missing_target_column(dataset, tmp_path, capsys):
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "sex", *FAST)
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_DATA and "'sex' is not a column" in err and "columns: dx" in err
    assert_nothing_written(out, work)


def test_single_class_target(dataset, tmp_path, capsys):
    (dataset / "participants.tsv").write_text(
        "participant_id\tdx\nsub-01\tad\nsub-02\tn/a\nsub-03\tad\nsub-04\tad\n")
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "dx", *FAST)
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_DATA
    assert "needs at least two classes" in err and "1 selected participant(s) have no value" in err
    assert_nothing_written(out, work)


def test_missing_or_unusable_atlas(dataset, tmp_path, capsys):
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "dx", "--atlas",
                          str(tmp_path / "nowhere_dseg.nii.gz"), *FAST)
    assert code == ExitCode.MISSING_INPUT and "nowhere_dseg.nii.gz: no such file" in capsys.readouterr().err
    assert_nothing_written(out, work)
    probabilities = save_nifti(tmp_path / "prob.nii.gz", np.full((4, 4, 4), 0.3, np.float32))
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "dx", "--atlas", str(probabilities), *FAST)
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_DATA and "prob.nii.gz" in err and "not a label image" in err
    assert_nothing_written(out, work)


def test_missing_participants_tsv(dataset, tmp_path, capsys):
    (dataset / "participants.tsv").unlink()
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "dx", *FAST)
    assert code == ExitCode.MISSING_INPUT and "participants.tsv not found" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_duplicate_participant_rows_that_disagree_are_refused(dataset, tmp_path, capsys):
    """Even without the validator: which row is right cannot be guessed."""
    with (dataset / "participants.tsv").open("a") as handle:
        handle.write("sub-03\tcn\n")  # sub-03 is 'ad' above
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "dx", "--cv-folds", "2", *FAST)
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_DATA
    assert "sub-03 has more than one row with different 'dx' values ('ad', then 'cn' on line 6)" in err
    assert_nothing_written(out, work)


def test_duplicate_participant_rows_that_agree_are_a_warning(dataset, tmp_path, capsys):
    with (dataset / "participants.tsv").open("a") as handle:
        handle.write("03\tad\n")  # the same participant, without 'sub-', same class
    code, _, _ = run(tmp_path, dataset, "group", "--target-column", "dx", "--cv-folds", "2", *FAST)
    assert code == ExitCode.OK and "sub-03 is listed twice (line 6)" in capsys.readouterr().err


def test_bad_images_can_leave_one_class(dataset, tmp_path, capsys):
    for label in ("02", "04"):  # both "cn"
        _corrupt("NaN", t1w_path(dataset, label))
    code, out, work = run(tmp_path, dataset, "group", "--target-column", "dx", "--cv-folds", "2", *FAST)
    assert code == ExitCode.BAD_DATA and "needs at least two classes" in capsys.readouterr().err
    assert_nothing_written(out, work)


def test_group_excludes_bad_participant_and_trains_on_the_rest(tmp_path, monkeypatch, capsys):
    install_fakes(monkeypatch)
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04", "05"),
                     targets={"dx": ["ad", "cn", "ad", "cn", "ad"]})
    _corrupt("truncated", t1w_path(bids, "05"))
    code, out, _ = run(tmp_path, bids, "group", "--target-column", "dx", "--cv-folds", "2", *FAST)
    assert code == ExitCode.FAILURE and "EXCLUDED sub-05" in capsys.readouterr().err
    trained_on = json.loads((out / "group" / "fake_training.json").read_text())["participants"]
    assert trained_on == ["01", "02", "03", "04"]


# ------------------------------------------------------------------ model bundle and template
def test_model_trained_on_another_resolution(dataset, tmp_path, capsys):
    model = write_model_card(tmp_path / "model", resolution=1)
    code, out, work = run(tmp_path, dataset, "participant", "--model", str(model), *FAST)
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_DATA and "trained on MNI152NLin2009aSym at resolution 1" in err
    assert_nothing_written(out, work)


def test_model_bundle_missing(dataset, tmp_path):
    code, out, work = run(tmp_path, dataset, "participant", "--model", str(tmp_path / "nope"), *FAST)
    assert code == ExitCode.MISSING_INPUT
    assert_nothing_written(out, work)


@pytest.mark.parametrize("damage,code,message", [
    ("truncate", ExitCode.BAD_DATA, "is truncated: the header promises"),
    ("empty", ExitCode.BAD_DATA, "is empty (0 bytes)"),
    ("pickle", ExitCode.BAD_DATA, "is a Python pickle, not a safetensors file"),
    ("remove weights", ExitCode.MISSING_INPUT, "weights file not found"),
    ("card mismatch", ExitCode.BAD_DATA, "weights do not match the architecture in model_card.json"),
    ("absurd channels", ExitCode.BAD_DATA, "parameters (more than 500,000,000)"),
])
def test_broken_model_bundle_is_refused_before_any_work(dataset, tmp_path, capsys, damage, code, message):
    import pickle

    model = write_model_card(tmp_path / "model")
    weights, card_path = model / "model.safetensors", model / "model_card.json"
    card = json.loads(card_path.read_text())
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "pickle":
        weights.write_bytes(pickle.dumps({"conv": [0.0] * 100}))
    elif damage == "remove weights":
        weights.unlink()
    else:
        card["architecture"]["channels"] = 3 if damage == "card mismatch" else 10**6
        card_path.write_text(json.dumps(card))
    got, out, work = run(tmp_path, dataset, "participant", "--model", str(model), *FAST)
    err = capsys.readouterr().err
    assert got == code and message in err, err
    assert_nothing_written(out, work)


def test_unknown_template_exits_66(tmp_path, monkeypatch, capsys):
    class TemplateNotFoundError(FileNotFoundError):
        pass

    def get_template(name, resolution):
        raise TemplateNotFoundError(f"template '{name}' not found ($TEMPLATEFLOW_HOME is unset)")

    monkeypatch.setitem(sys.modules, "grazbids.templates", types.SimpleNamespace(
        TemplateNotFoundError=TemplateNotFoundError, get_template=get_template))
    install_fakes(monkeypatch, check_templates=True)
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    code, out, work = run(tmp_path, bids, "participant", "--template", "OASIS30ANTs", *FAST)
    assert code == ExitCode.MISSING_INPUT and "template 'OASIS30ANTs' not found" in capsys.readouterr().err
    assert_nothing_written(out, work)
