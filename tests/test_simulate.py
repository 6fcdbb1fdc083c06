"""grazbids.simulate: simulated cohorts with a known effect and shortcut confounds.

Small cohorts at 4 mm voxels keep this fast; the template-space masks are always on the
template's 2 mm grid."""
import hashlib
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from grazbids.exitcodes import ExitCode
from grazbids.simulate import SimulationConfig, plan_cohort, simulate_cohort
from grazbids.simulate.anatomy import HEAD_REFERENCE_MNI, scan_source, template_source
from grazbids.simulate.cli import main
from grazbids.simulate.cohort import TEMPLATE_SOURCE
from grazbids.simulate.confounds import confound_counts
from grazbids.simulate.deformation import Grid, Pose, apply_affine
from grazbids.simulate.effects import AtrophyEffect, LesionEffect
from grazbids.simulate.participant import ParticipantPlan, simulate_participant
from grazbids.simulate.regions import REGIONS, get_region
from grazbids.templates import get_template
from grazbids.utils.bids_validator import find_validator, run_validator

VOXEL = 4.0
SMALL = dict(n_train=4, n_test=2, voxel_size=VOXEL, shortcut_correlation=1.0,
             test_correlation=0.5)


@pytest.fixture(scope="module")
def template():
    return get_template(resolution=2)


@pytest.fixture(scope="module")
def template_grid(template):
    img = nb.load(template.brain_mask)
    return Grid(img.shape, img.affine), np.asarray(img.dataobj) > 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "cohort"
    simulate_cohort(SimulationConfig(**SMALL), out, nprocs=1)
    return out


def _participants(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "participants.tsv", sep="\t", dtype={"shortcut": int})


def _details(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "derivatives/simulation/participants.tsv", sep="\t")


def _mask(root: Path, sub: str, desc: str, space: str = "") -> nb.Nifti1Image:
    space = f"_{space}" if space else ""
    return nb.load(root / f"derivatives/simulation/{sub}/anat/{sub}{space}_desc-{desc}_mask.nii.gz")


def _scanner_from_mni(row) -> np.ndarray:
    pose = Pose((row.rotation_x_deg, row.rotation_y_deg, row.rotation_z_deg),
                (row.translation_x_mm, row.translation_y_mm, row.translation_z_mm))
    return pose.matrix(np.asarray(HEAD_REFERENCE_MNI))  # template source: MNI = subject frame


def _simulate_pair(config, template, template_grid, change: str, source=None):
    """The same participant simulated twice, differing only in diagnosis or confound."""
    grid = Grid.centred(config.fov_mm, config.voxel_size)
    source = source or template_source(template, config.voxel_size)
    scans = {}
    for variant in (True, False):
        plan = ParticipantPlan(
            index=3, label="004", split="train", source=TEMPLATE_SOURCE,
            diagnosis="patient" if (variant or change != "diagnosis") else "control",
            shortcut=variant if change == "shortcut" else False)
        scans[variant] = simulate_participant(plan, source, config, grid, *template_grid)
    return scans[True], scans[False], grid


# --------------------------------------------------------------------------- cohort plan
@pytest.mark.parametrize("n_train,n_test,corr,test_corr", [(20, 10, 0.8, 0.5), (7, 4, 0.9, 0.0),
                                                           (10, 0, 1.0, 0.5)])
def test_confound_counts_are_exact(n_train, n_test, corr, test_corr):
    config = SimulationConfig(n_train=n_train, n_test=n_test, shortcut_correlation=corr,
                              test_correlation=test_corr)
    plans = plan_cohort(config, [TEMPLATE_SOURCE])
    assert [p.label for p in plans] == [f"{i:03d}" for i in range(1, n_train + n_test + 1)]
    for split, n, c in (("train", n_train, corr), ("test", n_test, test_corr)):
        members = [p for p in plans if p.split == split]
        patients = [p for p in members if p.diagnosis == "patient"]
        controls = [p for p in members if p.diagnosis == "control"]
        assert (len(patients), len(controls)) == (n // 2, n - n // 2)
        expected = confound_counts(len(patients), len(controls), c)
        assert (sum(p.shortcut for p in patients), sum(p.shortcut for p in controls)) == expected
    # 0.8 of 10 patients = 8, 0.2 of 10 controls = 2; 0.5 of 5 rounds half up to 3
    if (n_train, corr) == (20, 0.8):
        assert confound_counts(10, 10, 0.8) == (8, 2) and confound_counts(5, 5, 0.5) == (3, 3)


def test_no_shortcut_means_no_confound_anywhere():
    plans = plan_cohort(SimulationConfig(shortcut="none"), [TEMPLATE_SOURCE])
    assert not any(p.shortcut for p in plans)


# --------------------------------------------------------------------------- layout
def test_bids_layout_and_sidecars(cohort, template):
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0" and description["DatasetType"] == "raw"
    assert description["GeneratedBy"][0]["Name"] == "grazbids-simulate"
    table = _participants(cohort)
    assert list(table.columns) == ["participant_id", "diagnosis", "shortcut", "split"]
    assert set(table.diagnosis) == {"control", "patient"} and set(table.split) == {"train", "test"}
    # participants.tsv holds the exact counts: correlation 1.0 in train, 0.5 in test
    train, test = table[table.split == "train"], table[table.split == "test"]
    assert train.groupby("diagnosis").shortcut.sum().to_dict() == {"control": 0, "patient": 2}
    assert test.groupby("diagnosis").shortcut.sum().to_dict() == {"control": 1, "patient": 1}
    readme = (cohort / "README").read_text()
    for key in SimulationConfig().parameters():
        assert f"`{key}`" in readme
    assert "Seed: 42" in readme
    derivative = json.loads((cohort / "derivatives/simulation/dataset_description.json").read_text())
    assert derivative["DatasetType"] == "derivative"
    template_affine = nb.load(template.t1w).affine
    for sub in table.participant_id:
        t1w = nb.load(cohort / sub / "anat" / f"{sub}_T1w.nii.gz")
        assert t1w.get_data_dtype() == np.int16 and t1w.shape == (48, 56, 48)
        assert np.allclose(t1w.get_qform(), t1w.get_sform()) and np.allclose(t1w.header.get_zooms(), VOXEL)
        for desc in ("effect", "shortcut"):
            native = _mask(cohort, sub, desc)
            assert native.shape == t1w.shape and np.allclose(native.affine, t1w.affine)
            in_template = _mask(cohort, sub, desc, "space-MNI152NLin2009aSym_res-2")
            assert in_template.shape == template.shape
            assert np.allclose(in_template.affine, template_affine)
            sidecar = json.loads(Path(str(in_template.get_filename()).replace(".nii.gz", ".json"))
                                 .read_text())
            assert "Resolution" in sidecar and sidecar["Sources"]


@pytest.mark.skipif(find_validator() is None, reason="bids-validator-deno not installed")
def test_bids_validator_reports_no_errors(cohort):
    report = run_validator(cohort, timeout_s=120)
    assert report.errors == [], [report.describe(e) for e in report.errors[:5]]


# --------------------------------------------------------------------------- ground truth
def test_effect_masks_where_documented(cohort, template_grid):
    grid_t, template_brain = template_grid
    table = _participants(cohort).merge(_details(cohort), on="participant_id")
    region = get_region("lateral-ventricles")
    documented = np.mean([p.centre for p in region.parts], axis=0)
    for row in table.itertuples():
        in_template = _mask(cohort, row.participant_id, "effect",
                            "space-MNI152NLin2009aSym_res-2").get_fdata() > 0
        native_img = _mask(cohort, row.participant_id, "effect")
        native = native_img.get_fdata() > 0
        if row.diagnosis == "control":
            assert not in_template.any() and not native.any()
            continue
        assert in_template.sum() > 1000 and not (in_template & ~template_brain).any()
        centroid = apply_affine(grid_t.affine, np.argwhere(in_template).mean(0)[:, None])[:, 0]
        assert np.allclose(centroid, documented, atol=2.0), centroid
        # native: the mask, mapped back through the known pose, lies in the region's
        # ellipsoids grown by 8 mm (the 2 mm individual deformation, 4 mm voxels) ...
        scanner = apply_affine(native_img.affine, np.argwhere(native).T.astype(float))
        mni = apply_affine(np.linalg.inv(_scanner_from_mni(row)), scanner)
        inside = [np.linalg.norm((mni - np.asarray(part.centre)[:, None])
                                 / (np.asarray(part.radii)[:, None] + 8.0), axis=0) <= 1.0
                  for part in region.parts]
        assert np.all(np.any(inside, axis=0))
        # ... and covers the documented centres mapped into the scan
        for part in region.parts:
            centre = apply_affine(_scanner_from_mni(row), np.asarray(part.centre)[:, None])
            voxel = np.round(apply_affine(np.linalg.inv(native_img.affine), centre)[:, 0]).astype(int)
            assert native[tuple(voxel)]


def test_template_masks_of_other_regions(template_grid):
    grid_t, _ = template_grid
    for name in ("left-hippocampus", "right-parietal-wm"):
        region = get_region(name)
        for effect in (AtrophyEffect.from_regions([region], 0.3),
                       LesionEffect.from_regions([region], 0.5, "hypo", "ellipsoid", None)):
            mask = effect.mask(grid_t.points)
            centroid = grid_t.points[:, mask].mean(axis=1)
            assert np.allclose(centroid, region.parts[0].centre, atol=1.0), (name, centroid)


def test_region_centres_lie_in_the_expected_tissue(template):
    affine = nb.load(template.t1w).affine
    tissue = {k: nb.load(getattr(template, k)).get_fdata() for k in ("gm", "wm", "csf")}
    expected = {"ventricle": ("csf", 0.5), "hippocamp": ("gm", 0.5), "thalam": ("gm", 0.4),
                "-wm": ("wm", 0.9)}
    for name, region in REGIONS.items():
        (kind, level), = [v for k, v in expected.items() if k in name]
        for part in region.parts:
            voxel = np.round(np.linalg.solve(affine, [*part.centre, 1.0])[:3]).astype(int)
            assert tissue[kind][tuple(voxel)] >= level, (name, kind)


def test_atrophy_jacobian_matches_finite_differences():
    effect = AtrophyEffect.from_regions([get_region("left-hippocampus")], 0.45)
    rng = np.random.default_rng(0)
    centre = np.asarray(get_region("left-hippocampus").parts[0].centre)
    points = centre[:, None] + rng.uniform(-10, 10, size=(3, 50))
    h = 1e-4
    numeric = np.zeros((50, 3, 3))
    for axis in range(3):
        step = np.zeros((3, 1))
        step[axis] = h
        numeric[:, :, axis] = ((effect.backward(points + step) - effect.backward(points - step))
                               / (2 * h)).T
    assert np.allclose(effect.log_jacobian(points), np.log(np.linalg.det(numeric)), atol=1e-5)
    assert np.all(np.linalg.det(numeric) > 0)


@pytest.mark.parametrize("effect", ["atrophy", "lesion"])
def test_patient_differs_from_same_participant_only_near_effect(effect, template, template_grid):
    config = SimulationConfig(voxel_size=VOXEL, effect=effect, lesion_shape="blob")
    patient, control, _ = _simulate_pair(config, template, template_grid, "diagnosis")
    difference = np.abs(patient.t1w.astype(float) - control.t1w)
    near = ndi.binary_dilation(patient.effect_native, iterations=1)
    assert patient.effect_native.any() and not control.effect_native.any()
    assert not (difference[~near] > 0).any()
    median = np.median(control.t1w[control.brain])
    assert difference[patient.effect_native].max() > 0.2 * median


@pytest.mark.parametrize("kind,background", [("marker", "zero"), ("background", "zero"),
                                             ("padding", "noise")])
def test_confound_only_outside_brain(kind, background, template, template_grid):
    config = SimulationConfig(voxel_size=VOXEL, shortcut=kind, background=background)
    with_confound, without, _ = _simulate_pair(config, template, template_grid, "shortcut")
    changed = with_confound.t1w != without.t1w
    shortcut = with_confound.shortcut_native
    assert shortcut.any() and not without.shortcut_native.any()
    assert not (shortcut & with_confound.brain).any()
    assert changed.any() and not (changed & ~shortcut).any()
    assert with_confound.shortcut_template.any()
    assert not (with_confound.shortcut_template & template_grid[1]).any()
    if kind == "marker":
        median = np.median(without.t1w[without.brain])
        assert with_confound.t1w[shortcut].max() > 1.5 * median  # partial volume at 4 mm


def test_marker_in_cohort_is_outside_brain_and_bright(cohort):
    table = _participants(cohort)
    for row in table.itertuples():
        sub = row.participant_id
        shortcut = _mask(cohort, sub, "shortcut").get_fdata() > 0
        brain = _mask(cohort, sub, "brain").get_fdata() > 0
        assert shortcut.any() == bool(row.shortcut)
        assert not (shortcut & brain).any()


def test_pose_differs_between_participants(cohort):
    details = _details(cohort)
    poses = details[[c for c in details.columns if c.startswith(("rotation", "translation"))]]
    assert len(poses.drop_duplicates()) == len(poses)
    assert poses.filter(like="rotation").abs().to_numpy().max() <= 10.0
    centroids = [np.argwhere(_mask(cohort, sub, "brain").get_fdata() > 0).mean(0)
                 for sub in details.participant_id]
    assert np.min([np.linalg.norm(a - b) for i, a in enumerate(centroids)
                   for b in centroids[i + 1:]]) > 0.1


def test_real_scan_source_places_effect_through_its_affine(template, template_grid, tmp_path):
    """A "scan" = the template brain in another frame (known affine): the effect must
    still land on the documented MNI position in template space and in the scan."""
    rotation = Pose((0.0, 0.0, 15.0), (5.0, -8.0, 3.0)).matrix(np.zeros(3))
    scaling = np.diag([1.05, 1.05, 1.05, 1.0])  # keeps the volume plausible
    mni_to_source = rotation @ scaling
    img = nb.load(template.t1w)
    brain = np.asarray(nb.load(template.brain_mask).dataobj) > 0
    scan = tmp_path / "scan_T1w.nii.gz"
    nb.save(nb.Nifti1Image((img.get_fdata() * brain).astype(np.float32),
                           mni_to_source @ img.affine), scan)
    config = SimulationConfig(voxel_size=VOXEL, effect="lesion",
                              effect_regions=("right-parietal-wm",))
    source = scan_source(scan, mni_to_source, config.voxel_size)
    patient, control, grid = _simulate_pair(config, template, template_grid, "diagnosis",
                                            source=source)
    changed = patient.t1w != control.t1w
    assert patient.effect_native.any()
    assert not (changed & ~ndi.binary_dilation(patient.effect_native, iterations=1)).any()
    grid_t, _ = template_grid
    centroid = grid_t.points[:, patient.effect_template.reshape(-1)].mean(axis=1)
    assert np.allclose(centroid, get_region("right-parietal-wm").parts[0].centre, atol=1.0)


# --------------------------------------------------------------------------- determinism
def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_for_any_nprocs(cohort, tmp_path):
    again = tmp_path / "again"
    simulate_cohort(SimulationConfig(**SMALL), again, nprocs=2)
    assert _digests(again) == _digests(cohort)
    other = tmp_path / "other"
    simulate_cohort(SimulationConfig(**{**SMALL, "n_train": 2, "n_test": 0, "seed": 7}), other)
    sub = _participants(other).participant_id[0]
    first = nb.load(other / sub / "anat" / f"{sub}_T1w.nii.gz").get_fdata()
    assert not np.array_equal(first, nb.load(cohort / sub / "anat" / f"{sub}_T1w.nii.gz").get_fdata())


# --------------------------------------------------------------------------- bad input
def _run(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_input_exit_codes(tmp_path, capsys):
    out = tmp_path / "out"
    base = [str(out), "--n-train", "2", "--n-test", "0", "--voxel-size", "4", "-q"]
    code, err = _run(base + ["--anatomy", str(tmp_path / "missing.nii.gz")], capsys)
    assert code == ExitCode.MISSING_INPUT and "missing.nii.gz" in err
    four_d = tmp_path / "bold.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), four_d)
    code, err = _run(base + ["--anatomy", str(four_d)], capsys)
    assert code == ExitCode.BAD_DATA and "bold.nii.gz" in err and "4D" in err
    code, err = _run(base + ["--shortcut-correlation", "1.5"], capsys)
    assert code == ExitCode.USAGE and "--shortcut-correlation" in err
    code, err = _run(base + ["--shortcut", "padding"], capsys)
    assert code == ExitCode.USAGE and "--background noise" in err
    code, err = _run(base + ["--effect", "shrink"], capsys)
    assert code == ExitCode.USAGE
    assert not out.exists() and list(tmp_path.iterdir()) == [four_d]  # nothing half-written
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = _run(base, capsys)
    assert code == ExitCode.USAGE and "--overwrite" in err
    assert (out / "keep.txt").exists()


def test_overwrite_replaces_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _ = _run([str(out), "--n-train", "2", "--n-test", "0", "--voxel-size", "8",
                    "--nprocs", "1", "--overwrite", "-q"], capsys)
    assert code == 0 and not (out / "old.txt").exists()
    assert (out / "participants.tsv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    for default in ("(default: 32)", "(default: marker)", "(default: 0.9)", "lateral-ventricles"):
        assert default in text


# --------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.realdata
def test_real_anatomy_registration(real_bids_dir, template, tmp_path):
    from grazbids.interfaces.masks import brain_mask_from_t1w, dice
    from grazbids.simulate.anatomy import register_to_template

    scan = real_bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    mni_to_source = register_to_template(scan, template)
    img = nb.load(scan)
    brain = brain_mask_from_t1w(img.get_fdata()).astype(np.float32)
    mask_img = nb.load(template.brain_mask)
    grid = Grid(mask_img.shape, mask_img.affine)
    index = apply_affine(np.linalg.inv(img.affine) @ mni_to_source, grid.points)
    warped = ndi.map_coordinates(brain, index, order=1).reshape(grid.shape) > 0.5
    assert dice(warped, np.asarray(mask_img.dataobj) > 0) > 0.94
    out = tmp_path / "real"
    simulate_cohort(SimulationConfig(n_train=2, n_test=0, voxel_size=VOXEL,
                                     anatomy=(str(scan),)), out)
    details = _details(out)
    assert set(details.source_anatomy) == {str(scan)}
    patient = _participants(out).query("diagnosis == 'patient'").participant_id.iloc[0]
    assert (_mask(out, patient, "effect").get_fdata() > 0).sum() > 50
