"""Input checks: BIDS validator, participant selection, T1w image checks, group targets,
model cards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import (brain_like_volume, install_fakes, make_bids, restore_thread_settings,  # noqa: F401
                         save_nifti, save_sheared, t1w_path, write_huge_header, write_model_card)
from grazbids.cli.run import main
from grazbids.exitcodes import ExitCode, GrazbidsError
from grazbids.utils.bids_validator import find_validator, parse_report, run_validator
from grazbids.utils.model_card import check_model_space, read_model_input_space
from grazbids.bids.participants import check_target
from grazbids.bids.patterns import find_preprocessed_t1w
from grazbids.bids.selection import load_layout, select_participants
from grazbids.utils.validation import check_t1w_image

needs_validator = pytest.mark.skipif(find_validator() is None, reason="bids-validator-deno not installed")


# ------------------------------------------------------------------ T1w image checks
def _good(tmp_path) -> Path:
    return save_nifti(tmp_path / "good.nii.gz", brain_like_volume(0))


def test_good_image_passes(tmp_path):
    check = check_t1w_image(_good(tmp_path))
    assert check.ok and not check.notes


def test_truncated_gzip_is_caught(tmp_path):
    raw = _good(tmp_path).read_bytes()
    for cut in (len(raw) // 2, len(raw) - 20):  # header intact, data end early
        bad = tmp_path / f"cut{cut}.nii.gz"
        bad.write_bytes(raw[:cut])
        check = check_t1w_image(bad)
        assert not check.ok and "truncated or corrupt" in check.describe() and str(bad) in check.describe()


def test_truncated_header_and_garbage(tmp_path):
    raw = _good(tmp_path).read_bytes()
    (tmp_path / "head.nii.gz").write_bytes(raw[:30])
    (tmp_path / "text.nii.gz").write_bytes(b"not an image at all" * 20)
    (tmp_path / "plain.nii").write_bytes(b"\0" * 100)
    for name in ("head.nii.gz", "text.nii.gz", "plain.nii"):
        assert not check_t1w_image(tmp_path / name).ok


def test_declared_size_is_checked_before_reading(tmp_path, monkeypatch):
    from grazbids.utils import validation

    huge = write_huge_header(tmp_path / "huge.nii.gz", (20000, 20000, 20000))
    assert huge.stat().st_size < 100_000
    monkeypatch.setattr(validation.np, "asanyarray", lambda *a, **k: pytest.fail("data were read"))
    check = check_t1w_image(huge)
    assert not check.ok and "declares 20000x20000x20000 voxels" in check.describe() and "resample" in check.describe()


def test_absurd_but_valid_image_is_refused_by_the_voxel_rule(tmp_path):
    from grazbids.utils.validation import MAX_VOXELS, voxel_limit

    # 768^3 at 0.3 mm: only the header is needed to refuse it
    check = check_t1w_image(write_huge_header(tmp_path / "fine.nii.gz", (768, 768, 768)))
    assert not check.ok and "above the limit of 134,217,728 voxels" in check.describe()
    assert voxel_limit(None) == MAX_VOXELS == 512**3
    assert voxel_limit(1.0) == 100_000_000 and voxel_limit(1000) == MAX_VOXELS  # --mem-gb lowers it
    # a 20^3 image passes a generous limit, not a tiny one
    assert check_t1w_image(_good(tmp_path), max_voxels=8000).ok
    assert "above the limit of 7,999 voxels" in check_t1w_image(_good(tmp_path), max_voxels=7999).describe()


@pytest.mark.parametrize("shear,with_qform,ok", [(1e-6, False, True), (5e-4, False, False),
                                                 (0.2, False, False), (0.2, True, False)])
def test_sheared_affine_is_refused(tmp_path, shear, with_qform, ok):
    check = check_t1w_image(save_sheared(tmp_path / "s.nii.gz", shear, with_qform))
    assert check.ok == ok
    if not ok:
        assert "sheared (non-orthogonal) voxel-to-world affine" in check.describe()


def test_sheared_affine_really_breaks_itk(tmp_path):
    """The tolerance is ITK's: what passes is read by ANTs, what fails would crash it."""
    ants = pytest.importorskip("ants")
    ants.image_read(str(save_sheared(tmp_path / "fine.nii.gz", 5e-5)))
    with pytest.raises(Exception, match="orthonormal"):
        ants.image_read(str(save_sheared(tmp_path / "bad.nii.gz", 5e-4)))


def test_truncated_uncompressed_nifti(tmp_path):
    good = save_nifti(tmp_path / "good.nii", brain_like_volume(0))
    raw = good.read_bytes()
    bad = tmp_path / "short.nii"
    bad.write_bytes(raw[: len(raw) - 1000])
    assert not check_t1w_image(bad).ok


@pytest.mark.parametrize("data,expected", [
    (np.ones((20, 20), np.float32), "2D"),
    (np.ones((20, 20, 20, 3), np.float32), "4D"),
    (np.zeros((20, 20, 20), np.float32), "all voxels are zero"),
    (np.full((20, 20, 20), 7, np.int16), "constant"),
    (np.ones((20, 20, 2), np.float32), "at least 8 voxels"),
])
def test_shape_and_content_problems(tmp_path, data, expected):
    check = check_t1w_image(save_nifti(tmp_path / "x.nii.gz", data))
    assert not check.ok and expected in check.describe()


def test_nan_and_inf(tmp_path):
    data = brain_like_volume(1)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    check = check_t1w_image(save_nifti(tmp_path / "nan.nii.gz", data))
    assert "1 NaN and 2 infinite" in check.describe()


@pytest.mark.parametrize("zooms", [(0.001, 1, 1), (1, 1, 50)])
def test_absurd_voxel_sizes(tmp_path, zooms):
    check = check_t1w_image(save_nifti(tmp_path / "vox.nii.gz", brain_like_volume(0), zooms=zooms))
    assert not check.ok and "implausible voxel sizes" in check.describe()


def test_zeroed_pixdim(tmp_path):
    path = save_nifti(tmp_path / "vox.nii", brain_like_volume(0))
    raw = bytearray(path.read_bytes())
    raw[84:88] = np.float32(0).tobytes()  # pixdim[2] of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    check = check_t1w_image(path)
    assert not check.ok and "implausible voxel sizes (1.0, 0.0, 1.0)" in check.describe()


def test_singleton_fourth_dimension_is_accepted_with_a_note(tmp_path):
    data = brain_like_volume(0)[..., None]
    check = check_t1w_image(save_nifti(tmp_path / "t1w4d.nii.gz", data, zooms=(1, 1, 1, 2)))
    assert check.ok and "singleton 4th dimension" in check.describe()


def test_complex_and_missing_and_broken_link(tmp_path):
    data = (brain_like_volume(0) + 1j).astype(np.complex64)
    assert "complex" in check_t1w_image(save_nifti(tmp_path / "c.nii.gz", data)).describe()
    assert "does not exist" in check_t1w_image(tmp_path / "none.nii.gz").describe()
    link = tmp_path / "annexed.nii.gz"
    link.symlink_to(tmp_path / ".git" / "annex" / "objects" / "xyz")
    assert "broken symbolic link" in check_t1w_image(link).describe()


# ------------------------------------------------------------------ BIDS validator
def test_parse_report_splits_severities_and_explains_codes():
    stdout = json.dumps({"issues": {
        "issues": [
            {"code": "TSV_VALUE_INCORRECT_TYPE", "subCode": "gender", "severity": "error",
             "location": "/participants.tsv", "issueMessage": "'m'", "line": 2},
            {"code": "JSON_KEY_RECOMMENDED", "subCode": "Authors", "severity": "warning",
             "location": "/dataset_description.json"},
        ],
        "codeMessages": {"TSV_VALUE_INCORRECT_TYPE": "A value did not match the column type."}}})
    report = parse_report(stdout)
    assert len(report.errors) == 1 and len(report.warnings) == 1
    text = report.describe(report.errors[0])
    assert text.startswith("TSV_VALUE_INCORRECT_TYPE/gender at /participants.tsv:2: 'm'")
    assert "did not match" in text
    assert report.warning_counts() == {"JSON_KEY_RECOMMENDED": 1}


def test_parse_report_without_json_explains():
    from grazbids.utils.bids_validator import ValidatorUnavailable

    with pytest.raises(ValidatorUnavailable, match="without a JSON report"):
        parse_report("", "error: permission denied", 1)


@needs_validator
def test_synthetic_dataset_validates(tmp_path):
    report = run_validator(make_bids(tmp_path / "bids", targets={"dx": ["a", "b", "a"]}))
    assert report.errors == []


@needs_validator
def test_invalid_dataset_exits_16_and_lists_errors(tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids")
    (bids / "sub-01" / "anat" / "sub-01_T1W.nii.gz").write_bytes(b"")  # not a BIDS name
    install_fakes(monkeypatch)
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "-w", str(tmp_path / "w")]) == ExitCode.VALIDATION_FAILED
    err = capsys.readouterr().err
    assert "is not valid BIDS" in err and "sub-01_T1W.nii.gz" in err and "--skip-bids-validation" in err
    assert not out.exists() and not (tmp_path / "w").exists()  # nothing written


def test_missing_validator_is_a_clear_failure(tmp_path, monkeypatch, capsys):
    from grazbids.utils import bids_validator

    monkeypatch.setattr(bids_validator, "find_validator", lambda: None)
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert main([str(bids), str(tmp_path / "out"), "participant"]) == ExitCode.FAILURE
    assert "--skip-bids-validation" in capsys.readouterr().err


@pytest.mark.realdata
@needs_validator
def test_real_dataset_fails_validation_on_gender_levels(real_bids_dir, tmp_path, capsys):
    report = run_validator(real_bids_dir)
    assert [(e["code"], e.get("subCode"), e["location"]) for e in report.errors] == [
        ("TSV_VALUE_INCORRECT_TYPE", "gender", "/participants.tsv")]
    assert {w["code"] for w in report.warnings} <= {"JSON_KEY_RECOMMENDED", "SIDECAR_KEY_RECOMMENDED"}
    code = main([str(real_bids_dir), str(tmp_path / "out"), "participant", "--participant-label", "01"])
    assert code == ExitCode.VALIDATION_FAILED
    assert "TSV_VALUE_INCORRECT_TYPE/gender" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
def test_real_dataset_runs_with_skip_validation(real_bids_dir, tmp_path, monkeypatch):
    calls = []
    install_fakes(monkeypatch, participant_calls=calls)
    code = main([str(real_bids_dir), str(tmp_path / "out"), "participant", "--participant-label", "01",
                 "--skip-bids-validation", "--plugin", "Linear", "-w", str(tmp_path / "w")])
    assert code == ExitCode.OK
    # compared resolved: the dataset may be reached through a symlink
    expected = real_bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert [Path(f).resolve() for f in calls[0]["t1w_files"]] == [expected.resolve()]
    description = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert description["SourceDatasets"][0]["DOI"] == "doi:10.18112/openneuro.ds002748.v1.0.5"


# ------------------------------------------------------------------ participant selection
def test_selection_all_and_requested(tmp_path):
    layout = load_layout(make_bids(tmp_path / "bids", subjects=("01", "02", "10")))
    assert list(select_participants(layout, ()).t1w_files) == ["01", "02", "10"]
    chosen = select_participants(layout, ("10",))
    assert list(chosen.t1w_files) == ["10"] and chosen.t1w_files["10"][0].name == "sub-10_T1w.nii.gz"


def test_unknown_participant_is_refused(tmp_path):
    layout = load_layout(make_bids(tmp_path / "bids", subjects=("01", "02")))
    with pytest.raises(GrazbidsError) as info:
        select_participants(layout, ("01", "99"))
    assert info.value.code == ExitCode.MISSING_INPUT
    assert "sub-99" in info.value.message and "sub-01, sub-02" in info.value.message


def test_sessions_filter(tmp_path):
    layout = load_layout(make_bids(tmp_path / "bids", subjects=("01",), sessions=("pre", "post")))
    assert len(select_participants(layout, ()).t1w_files["01"]) == 2
    only_pre = select_participants(layout, (), ("pre",)).t1w_files["01"]
    assert [p.name for p in only_pre] == ["sub-01_ses-pre_T1w.nii.gz"]
    assert select_participants(layout, (), ("late",)).without_t1w == ["01"]


def test_find_preprocessed_t1w_accepts_padded_resolution(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for name in ("sub-01_space-MNI152NLin2009aSym_res-02_desc-preproc_T1w.nii.gz",
                 "sub-01_space-MNI152NLin2009aSym_res-1_desc-preproc_T1w.nii.gz",
                 "sub-01_space-Other_res-2_desc-preproc_T1w.nii.gz"):
        (anat / name).touch()
    found = find_preprocessed_t1w(tmp_path, "01", "MNI152NLin2009aSym", 2)
    assert [p.name for p in found] == ["sub-01_space-MNI152NLin2009aSym_res-02_desc-preproc_T1w.nii.gz"]
    assert find_preprocessed_t1w(tmp_path, "02", "MNI152NLin2009aSym", 2) == []


# ------------------------------------------------------------------ group targets
def test_target_column_classes_and_missing_values(tmp_path):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04", "05"),
                     targets={"dx": ["ad", "cn", "n/a", "ad", "cn"]})
    summary = check_target(bids, "dx", ["01", "02", "03", "04", "05", "06"], cv_folds=2)
    assert summary.class_counts() == {"ad": 2, "cn": 2}
    assert summary.without_value == ["03", "06"]  # n/a, and no row at all


@pytest.mark.parametrize("values,column,message", [
    (["ad", "ad", "ad"], "dx", "at least two classes"),
    (["ad", "n/a", "n/a"], "dx", "found 1"),
    (["ad", "cn", "ad"], "sex", "is not a column"),
    (["31", "45", "52"], "dx", "looks continuous"),
])
def test_untrainable_targets_give_65(tmp_path, values, column, message):
    bids = make_bids(tmp_path / "bids", targets={"dx": values})
    with pytest.raises(GrazbidsError) as info:
        check_target(bids, column, ["01", "02", "03"], cv_folds=2)
    assert info.value.code == ExitCode.BAD_DATA and message in info.value.message


def test_too_few_participants_for_the_folds(tmp_path):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02", "03", "04"),
                     targets={"dx": ["a", "b", "a", "b"]})
    with pytest.raises(GrazbidsError, match="--cv-folds 5 needs at least 5"):
        check_target(bids, "dx", ["01", "02", "03", "04"], cv_folds=5)


# ------------------------------------------------------------------ model cards
def test_model_card_space(tmp_path):
    bundle = write_model_card(tmp_path / "m", template="MNI152NLin2009aSym", resolution=1)
    assert read_model_input_space(bundle) == ("MNI152NLin2009aSym", 1)
    assert read_model_input_space(bundle / "model_card.json") == ("MNI152NLin2009aSym", 1)
    check_model_space(bundle, "MNI152NLin2009aSym", 1)
    with pytest.raises(GrazbidsError) as info:
        check_model_space(bundle, "MNI152NLin2009aSym", 2)
    assert info.value.code == ExitCode.BAD_DATA and "--resolution 1" in info.value.message


def test_model_card_problems(tmp_path):
    with pytest.raises(GrazbidsError) as info:
        read_model_input_space(tmp_path / "absent")
    assert info.value.code == ExitCode.MISSING_INPUT
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrazbidsError) as info:
        read_model_input_space(tmp_path / "empty")
    assert info.value.code == ExitCode.MISSING_INPUT and "model_card.json" in info.value.message
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_card.json").write_text("{not json")
    with pytest.raises(GrazbidsError) as info:
        read_model_input_space(tmp_path / "bad")
    assert info.value.code == ExitCode.BAD_DATA
    (tmp_path / "bad" / "model_card.json").write_text(json.dumps({"input": {"template": "X"}}))
    with pytest.raises(GrazbidsError, match="input.resolution"):
        read_model_input_space(tmp_path / "bad")


def test_helpers_make_expected_files(tmp_path):
    bids = make_bids(tmp_path / "bids", subjects=("07",))
    assert t1w_path(bids, "07").exists()
