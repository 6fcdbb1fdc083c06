"""BIDS files of a simulated cohort: the raw dataset and `derivatives/simulation`.

Files are written plainly: the whole dataset is built in a temporary folder that is
renamed into place at the end (grazbids.simulate.cohort), which makes it atomic.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np

from .. import __version__
from ..templates import TemplateFiles
from .config import SimulationConfig
from .confounds import (BACKGROUND_OFFSET, GHOST_INTENSITY, MARKER_INTENSITY, MARKER_POSITION_MNI,
                        MARKER_RADIUS_MM, PADDING_MARGIN_MM)
from .deformation import Grid
from .effects import ATROPHY_DISPLACEMENT_TOL_MM, ATROPHY_LOG_JACOBIAN_TOL, LESION_MASK_LEVEL
from .participant import ParticipantPlan, SimulatedScan
from .regions import describe_regions

BIDS_VERSION = "1.9.0"
GENERATOR = "grazbids-simulate"
DERIVATIVE = Path("derivatives") / "simulation"
SPACE = "space-MNI152NLin2009aSym_res-2"


def _json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray, code: int) -> None:
    """qform == sform (code 1 scanner, 4 MNI), mm units."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nb.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=code)
    img.set_sform(affine, code=code)
    nb.save(img, path)


def _generated_by() -> list[dict]:
    return [{"Name": GENERATOR, "Version": __version__,
             "Description": "grazbids.simulate: simulated T1w cohort with a known effect "
                            "and a shortcut confound"}]


# --------------------------------------------------------------------------- participants
def t1w_path(label: str) -> str:
    return f"sub-{label}/anat/sub-{label}_T1w.nii.gz"


def _effect_description(config: SimulationConfig) -> str:
    if config.effect == "atrophy":
        return (f"atrophy of {', '.join(config.regions)} (linear size change "
                f"{config.strength:g} at the region centre); voxels where the simulated "
                f"deformation changes the local volume (|log det J| > "
                f"{ATROPHY_LOG_JACOBIAN_TOL:g}) or moves the anatomy by more than "
                f"{ATROPHY_DISPLACEMENT_TOL_MM:g} mm, inside the brain")
    if config.effect == "lesion":
        return (f"{config.effect_contrast}intense {config.lesion_shape} lesion(s) in "
                f"{', '.join(config.regions)} (intensity change {config.strength:g}); "
                f"voxels whose intensity changed by more than {LESION_MASK_LEVEL:g} of "
                "the lesion contrast, inside the brain")
    return "no effect simulated (--effect none): empty for everyone"


def _shortcut_description(config: SimulationConfig) -> str:
    return {
        "marker": f"bright sphere (radius {MARKER_RADIUS_MM:g} mm) fixed in scanner "
                  "coordinates beside the head",
        "background": "background (everything outside the brain) with an intensity offset",
        "padding": f"zero-filled border: voxels more than {PADDING_MARGIN_MM:g} mm outside "
                   "the brain's bounding box",
        "ghost": f"N/2 ghost of the head outside the brain ({GHOST_INTENSITY:g} x the signal, shifted by "
                 "half the field of view anterior-posterior)",
    }.get(config.shortcut, "none")


def write_participant(root: Path, plan: ParticipantPlan, scan: SimulatedScan, grid: Grid,
                      template: TemplateFiles, config: SimulationConfig) -> None:
    """The T1w (raw) and the participant's ground-truth masks (derivative)."""
    label = plan.label
    _nifti(root / t1w_path(label), scan.t1w, grid.affine, code=1)
    template_affine = nb.load(template.t1w).affine
    anat = root / DERIVATIVE / f"sub-{label}" / "anat"
    source = f"bids:raw:{t1w_path(label)}"
    resolution = template.resolution_description()
    masks = [("brain", scan.brain, None, {
        "Type": "Brain", "Description": "brain of the source anatomy as resampled into "
                                        "this scan (linear interpolation > 0.5)"})]
    effect_meta = {"Type": "Lesion" if config.effect == "lesion" else "ROI",
                   "Description": _effect_description(config), "Effect": config.effect,
                   "Regions": list(config.regions), "Strength": config.strength,
                   "Diagnosis": plan.diagnosis}
    masks.append(("effect", scan.effect_native, scan.effect_template, effect_meta))
    if config.shortcut != "none":
        masks.append(("shortcut", scan.shortcut_native, scan.shortcut_template, {
            "Type": "ROI", "Description": _shortcut_description(config),
            "Shortcut": config.shortcut, "ConfoundPresent": plan.shortcut}))
    for desc, native, in_template, meta in masks:
        stem = f"sub-{label}_desc-{desc}_mask"
        _nifti(anat / f"{stem}.nii.gz", native.astype(np.uint8), grid.affine, code=1)
        _json(anat / f"{stem}.json", {**meta, "Sources": [source]})
        if in_template is not None:
            stem = f"sub-{label}_{SPACE}_desc-{desc}_mask"
            _nifti(anat / f"{stem}.nii.gz", in_template.astype(np.uint8), template_affine,
                   code=4)
            _json(anat / f"{stem}.json", {
                **meta, "Sources": [source], "Resolution": resolution,
                "SpatialReference": "known from the simulation (head pose and source "
                                    "registration), no image registration"})


def participant_row(plan: ParticipantPlan, scan: SimulatedScan) -> dict:
    """The participant's simulation parameters for derivatives/simulation/participants.tsv."""
    pose = scan.details["pose"]
    marker = scan.details.get("marker_centre_mm")
    row = {"participant_id": f"sub-{plan.label}", "source_anatomy": plan.source}
    row.update({f"rotation_{a}_deg": round(v, 4) for a, v in zip("xyz", pose.angles_deg)})
    row.update({f"translation_{a}_mm": round(v, 4) for a, v in zip("xyz", pose.translation_mm)})
    row["intensity_scale"] = round(scan.details["intensity_scale"], 6)
    for axis, k in zip("xyz", range(3)):
        row[f"marker_{axis}_mm"] = "n/a" if marker is None else round(float(marker[k]), 3)
    row["effect_voxels"] = int(scan.effect_native.sum())
    row["effect_voxels_template"] = int(scan.effect_template.sum())
    return row


# --------------------------------------------------------------------------- dataset level
def _tsv(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")


_PARTICIPANTS_JSON = {
    "participant_id": {"Description": "participant label"},
    "diagnosis": {"Description": "simulated class", "Levels": {
        "control": "no effect", "patient": "the simulated effect (see README)"}},
    "shortcut": {"Description": "1 if the shortcut confound is present in this scan",
                 "Levels": {"0": "absent", "1": "present"}},
    "split": {"Description": "intended use", "Levels": {
        "train": "training split (confound correlated with the diagnosis)",
        "test": "test split (confound at --test-correlation)"}},
}

_DERIVATIVE_COLUMNS = {
    "source_anatomy": "source brain: 'template' (embedded MNI152NLin2009aSym) or a scan path",
    "rotation_x_deg": "head pose: rotation about x (extrinsic x-y-z Euler angles, degrees)",
    "rotation_y_deg": "head pose: rotation about y (degrees)",
    "rotation_z_deg": "head pose: rotation about z (degrees)",
    "translation_x_mm": "head pose: translation along x (mm)",
    "translation_y_mm": "head pose: translation along y (mm)",
    "translation_z_mm": "head pose: translation along z (mm)",
    "intensity_scale": "global scanner gain (intensity = 1000 x scale x relative intensity)",
    "marker_x_mm": "shortcut marker centre, scanner x (mm; n/a without a marker)",
    "marker_y_mm": "shortcut marker centre, scanner y (mm)",
    "marker_z_mm": "shortcut marker centre, scanner z (mm)",
    "effect_voxels": "voxels in the native-space effect mask",
    "effect_voxels_template": "voxels in the template-space effect mask",
}


def write_dataset_files(root: Path, config: SimulationConfig, plans: list[ParticipantPlan],
                        rows: list[dict], command: str) -> None:
    name = (f"grazbids-simulate cohort: effect {config.effect}"
            + (f" ({', '.join(config.regions)})" if config.regions else "")
            + f", shortcut {config.shortcut}")
    _json(root / "dataset_description.json", {
        "Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "GeneratedBy": _generated_by()})
    _tsv(root / "participants.tsv", [
        {"participant_id": f"sub-{p.label}", "diagnosis": p.diagnosis,
         "shortcut": int(p.shortcut), "split": p.split} for p in plans])
    _json(root / "participants.json", _PARTICIPANTS_JSON)
    (root / "README").write_text(readme_text(config, plans, command))

    derivative = root / DERIVATIVE
    _json(derivative / "dataset_description.json", {
        "Name": f"Ground truth of: {name}", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": _generated_by(),
        "DatasetLinks": {"raw": "../../"}})
    (derivative / "README").write_text(
        "Ground truth of the simulated cohort in ../../ (see its README): per participant "
        "the effect, shortcut and brain masks in the T1w's space and on the "
        "MNI152NLin2009aSym res-2 grid; participants.tsv lists every participant's "
        "simulation parameters.\n")
    _tsv(derivative / "participants.tsv", rows)
    _json(derivative / "participants.json",
          {c: {"Description": d} for c, d in _DERIVATIVE_COLUMNS.items()})


def readme_text(config: SimulationConfig, plans: list[ParticipantPlan], command: str) -> str:
    params = "\n".join(f"- `{key}`: {value}" for key, value in config.parameters().items())
    counts = []
    for split, corr in (("train", config.shortcut_correlation), ("test", config.test_correlation)):
        members = [p for p in plans if p.split == split]
        if not members:
            continue
        for diagnosis in ("patient", "control"):
            group = [p for p in members if p.diagnosis == diagnosis]
            with_confound = sum(p.shortcut for p in group)
            counts.append(f"- {split}, {diagnosis}s: {len(group)}, with the confound: "
                          f"{with_confound}")
    shortcut_detail = {
        "marker": f"a sphere of radius {MARKER_RADIUS_MM:g} mm and {MARKER_INTENSITY:g} x the "
                  f"brain median, fixed in scanner coordinates at MNI {MARKER_POSITION_MNI} "
                  "for the identity head pose (right-anterior-superior of the head)",
        "background": f"{BACKGROUND_OFFSET:g} x the brain median added outside the brain",
        "padding": f"voxels more than {PADDING_MARGIN_MM:g} mm outside the brain's "
                   "bounding box set to exactly 0 (reduced field of view, zero-filled)",
        "ghost": f"an N/2 ghost: the head shifted by half the field of view (anterior-posterior) at "
                 f"{GHOST_INTENSITY:g} x its signal, added outside the brain",
        "none": "no confound",
    }[config.shortcut]
    return f"""# Simulated T1w cohort (grazbids-simulate {__version__})

Synthetic brain MRI with a known effect and a shortcut confound, made by
`grazbids-simulate` (grazbids.simulate; see docs/simulation.md of grazbids). Nothing
here comes from a real participant's diagnosis.

Reproduce (byte-identical) with:

    {command}

Seed: {config.seed}

## Parameters

{params}

## Classes and confound

Diagnosis `patient` carries the effect: {_effect_description(config)}.
Shortcut `{config.shortcut}`: {shortcut_detail}. The confound is present in
round(c x patients) patients and round((1 - c) x controls) controls of a split, with
c = {config.shortcut_correlation:g} in `train` and {config.test_correlation:g} in `test`:

{chr(10).join(counts)}

## Simulation

Each scan: source anatomy (the embedded MNI152NLin2009aSym brain, or real skull-stripped
scans cycled through, registered affinely to the template once each) -> smooth random
deformation (B-spline, control points every 32 mm, {config.deformation_mm:g} mm s.d.) ->
random head pose (rotations up to {config.max_rotation_deg:g} deg, translations up to
{config.max_translation_mm:g} mm) -> effect (patients) -> one cubic-spline resampling onto a
{config.voxel_size:g} mm grid of {' x '.join(f'{f:g}' for f in config.fov_mm)} mm ->
shortcut confound -> multiplicative bias field (max |log| {config.bias_strength:g}) -> Rician
noise (sigma {config.noise:g} x brain median) -> background {config.background} -> global
gain (log-uniform in {config.intensity_scale}) -> int16.

Effect regions (MNI152NLin2009aSym mm; ellipsoid centre and semi-axes):

{chr(10).join("- " + line for line in describe_regions().splitlines())}

## Ground truth (derivatives/simulation)

Per participant, in the native space of the T1w and on the template grid
(`{SPACE}`, the embedded template's 97 x 115 x 97 grid of 2 mm):
`desc-effect_mask` (empty for controls), `desc-shortcut_mask` (empty without the
confound; not written for `--shortcut none`) and, native only, `desc-brain_mask`.
Template-space masks are placed through the known pose and source affine, not by image
registration; they leave out the small non-affine individual deformation.
`derivatives/simulation/participants.tsv` lists every participant's pose, gain, source
and marker position.

The anatomy of the default source is the ICBM 2009a Nonlinear Symmetric template:
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University (see grazbids' embedded template LICENSE).
"""
