"""Synthetic participant and group outputs (as grazbids writes them) for report tests."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

TPL = "MNI152NLin2009aSym"
CV_ROWS = [
    {"fold": 1, "n_train": 4, "n_validation": 2, "selected_epoch": 3, "balanced_accuracy": 0.75,
     "accuracy": 0.5, "relevance_inside_mask": 0.912345},
    {"fold": 2, "n_train": 4, "n_validation": 2, "selected_epoch": 2, "balanced_accuracy": 0.625,
     "accuracy": 0.5, "relevance_inside_mask": 0.876543},
]


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def _save(path: Path, data: np.ndarray, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(data, affine), str(path))
    return path


def write_participant_outputs(out: Path, subject: str = "01", shape=(20, 24, 20), with_model: bool = True,
                              dice: float = 0.95) -> Path:
    """Template-space derivatives of one T1w (+ heat map and predictions) with sidecars."""
    anat = out / f"sub-{subject}" / "anat"
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -np.array(shape) + 1  # centred grid, like the templates
    centre = (np.array(shape) - 1) / 2
    brain = _ball(shape, centre, min(shape) * 0.4)
    wm = _ball(shape, centre, min(shape) * 0.2)
    rng = np.random.default_rng(int(subject) if subject.isdigit() else 0)
    t1w = np.where(brain, 400 + 300 * wm + rng.normal(0, 20, shape), 0).astype(np.float32)
    stem = f"sub-{subject}_space-{TPL}_res-2"
    _save(anat / f"{stem}_desc-preproc_T1w.nii.gz", t1w, affine)
    (anat / f"{stem}_desc-preproc_T1w.json").write_text(json.dumps({
        "Sources": [f"bids:raw:sub-{subject}/anat/sub-{subject}_T1w.nii.gz"], "SpatialReference": TPL,
        "Resolution": "2 mm isotropic test grid", "SkullStripped": True,
        "RegistrationQC": {"BrainMaskDice": dice, "Definition": "test"}}))
    _save(anat / f"{stem}_desc-brain_mask.nii.gz", brain.astype(np.uint8), affine)
    tissues = {"GM": brain & ~wm, "WM": wm, "CSF": np.zeros(shape, bool)}
    for label, region in tissues.items():
        _save(anat / f"{stem}_label-{label}_probseg.nii.gz", region.astype(np.float32), affine)
    (anat / f"sub-{subject}_from-T1w_to-{TPL}_mode-image_xfm.json").write_text(json.dumps({
        "RegistrationType": "affine", "Stages": ["Rigid", "Affine"], "Software": "ANTsPy test"}))
    if with_model:
        heat = np.where(brain, rng.uniform(0, 1, shape), 0) + 4.0 * _ball(shape, centre + 3, 2)
        heat[0] = 1.0  # relevance outside the brain (one face of the grid)
        _save(anat / f"{stem}_desc-zplus_heatmap.nii.gz", (heat / heat.sum()).astype(np.float32), affine)
        (anat / f"sub-{subject}_desc-grazplus_predictions.tsv").write_text(
            "predicted_label\tprobability_f\tprobability_m\nm\t0.123456\t0.876544\n")
    return anat


def write_group_outputs(out: Path, shape=(20, 24, 20), explanation: bool = True, epochs: int = 4) -> Path:
    """``group/mode-grazplus`` as group_training writes it (hand-made numbers)."""
    mode_dir = out / "group" / "mode-grazplus"
    (mode_dir / "history").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(CV_ROWS).to_csv(mode_dir / "cv_metrics.tsv", sep="\t", index=False)
    (mode_dir / "cv_metrics.json").write_text(json.dumps({
        "mode": "grazplus", "folds": 2, "target_column": "gender", "classes": ["f", "m"],
        "balanced_accuracy_mean": 0.6875, "balanced_accuracy_sd": 0.088388, "balanced_accuracy_min": 0.625,
        "balanced_accuracy_max": 0.75, "pooled_oof_balanced_accuracy": 0.666667,
        "relevance_inside_mask_mean": 0.894444, "per_fold": CV_ROWS}))
    participants = [f"sub-{i:02d}" for i in range(1, 5)]
    true, predicted = ["f", "m", "f", "m"], ["f", "m", "m", "m"]
    pd.DataFrame({"participant_id": participants, "session_id": ["n/a"] * 4, "fold": [1, 1, 2, 2],
                  "true_label": true, "predicted_label": predicted,
                  "probability_f": [0.8, 0.3, 0.4, 0.1], "probability_m": [0.2, 0.7, 0.6, 0.9],
                  "relevance_inside_mask": [0.9, 0.92, 0.88, 0.87]}).to_csv(
        mode_dir / "oof_predictions.tsv", sep="\t", index=False, na_rep="n/a")
    rng = np.random.default_rng(1)
    for fold in (1, 2):
        epoch = np.arange(1, epochs + 1)
        pd.DataFrame({"epoch": epoch, "train_loss": 1 / epoch, "train_ce": 1 / epoch,
                      "train_relevance_inside": 0.5 + 0.1 * epoch / epochs,
                      "train_balanced_accuracy": np.minimum(1, 0.5 + 0.1 * epoch),
                      "val_loss": 1.2 / epoch + rng.uniform(0, 0.1, epochs), "val_ce": 1.1 / epoch,
                      "val_relevance_inside": 0.6 + 0.05 * epoch / epochs,
                      "val_balanced_accuracy": rng.uniform(0.5, 0.8, epochs)}).to_csv(
            mode_dir / "history" / f"fold-{fold}_history.tsv", sep="\t", index=False)
    pd.DataFrame({"epoch": [1, 2], "train_loss": [0.9, 0.5], "train_ce": [0.9, 0.5],
                  "train_relevance_inside": [0.6, 0.7], "train_balanced_accuracy": [0.6, 0.8]}).to_csv(
        mode_dir / "history" / "final_history.tsv", sep="\t", index=False)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    centre = (np.array(shape) - 1) / 2
    for cls, shift in (("f", -3), ("m", 3)):
        heat = _ball(shape, centre + shift, 3).astype(np.float32) + 0.01
        _save(mode_dir / f"tpl-{TPL}_res-2_class-{cls}_desc-meanzplus_heatmap.nii.gz", heat / heat.sum(), affine)
    if explanation:
        pd.DataFrame({"participant_id": participants, "session_id": ["n/a"] * 4, "true_label": true,
                      "predicted_label": predicted, "relevance_inside_brain": [0.9, 0.92, 0.88, 0.87],
                      "relevance_gm": [0.5, 0.55, 0.45, 0.5], "relevance_wm": [0.3, 0.3, 0.35, 0.3],
                      "relevance_csf": [0.1, 0.07, 0.08, 0.07],
                      "relevance_outside_brain": [0.1, 0.08, 0.12, 0.13]}).to_csv(
            mode_dir / "explanation_metrics.tsv", sep="\t", index=False)
        (mode_dir / "explanation_summary.json").write_text(json.dumps({
            "mean": {"relevance_inside_brain": 0.8925, "relevance_gm": 0.5},
            "mean_by_true_label": {"f": {"relevance_gm": 0.475}, "m": {"relevance_gm": 0.525}}}))
    return mode_dir


def _counterfactual_meta(direction: str, flips: bool) -> dict:
    """Sidecar fields as grazbids.counterfactual.run.sidecar writes them."""
    before = {"f": 0.123456, "m": 0.876544}  # predicted m (the disease class of these tests)
    if direction == "remove":
        after = {"f": 0.61, "m": 0.39} if flips else {"f": 0.2, "m": 0.8}
    else:  # already m: inject can only push further
        after = {"f": 0.05, "m": 0.95}
    return {"Description": "counterfactual (%s the pattern of class 'm')" % direction, "Direction": direction,
            "ModelClasses": ["f", "m"], "PositiveClass": "m", "ProbabilitiesBefore": before,
            "ProbabilitiesAfter": after, "PredictedBefore": max(before, key=before.get),
            "PredictedAfter": max(after, key=after.get), "LogOddsBefore": float(np.log(before["m"] / before["f"])),
            "LogOddsAfter": float(np.log(after["m"] / after["f"])),
            "FoldedFraction": 0.00125, "MinJacobianDeterminant": 0.42, "Diffeomorphic": False,
            "SkullStripped": True}


def write_counterfactual_outputs(anat: Path, subject: str = "01", remove_flips: bool = True) -> dict[str, Path]:
    """desc-inject/desc-remove T1w and log-Jacobian (template space) with sidecars, as the
    participant level writes them beside ``write_participant_outputs``."""
    stem = anat / f"sub-{subject}_space-{TPL}_res-2"
    t1w = nb.load(f"{stem}_desc-preproc_T1w.nii.gz")
    brain = np.asanyarray(nb.load(f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
    centre = (np.array(t1w.shape) - 1) / 2
    written = {}
    for direction, sign in (("inject", -1.0), ("remove", 1.0)):
        blob = _ball(t1w.shape, centre + 2, 3)
        logjac = np.where(brain, sign * 0.3 * blob - sign * 0.05 * ~blob, 0).astype(np.float32)
        simulated = np.asanyarray(t1w.dataobj) * (1 + 0.1 * sign * blob)
        meta = _counterfactual_meta(direction, remove_flips)
        for kind, data in (("T1w", simulated.astype(np.float32)), ("logjacobian", logjac)):
            path = _save(Path(f"{stem}_desc-{direction}_{kind}.nii.gz"), data, t1w.affine)
            path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
            written[f"{direction}_{kind}"] = path
    return written


def write_group_counterfactual(mode_dir: Path, shape=(20, 24, 20), flip_inject: float = 0.75,
                               regions: bool = True) -> Path:
    """``mode-<mode>/counterfactual/`` and ``model/simulator/simulator_card.json`` as
    grazbids.counterfactual.group writes them (hand-made numbers)."""
    folder = mode_dir / "counterfactual"
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    centre = (np.array(shape) - 1) / 2
    maps = {}
    for cls, direction, sign in (("f", "inject", -1.0), ("m", "remove", 1.0)):
        data = sign * (0.2 * _ball(shape, centre - 2, 3) - 0.1 * _ball(shape, centre + 3, 2))
        name = f"tpl-{TPL}_res-2_class-{cls}_desc-{direction}_logjacobian.nii.gz"
        _save(folder / name, data.astype(np.float32), affine)
        maps[f"{cls}/{direction}"] = name
    (folder / "summary.json").write_text(json.dumps({
        "classes": ["f", "m"], "positive_class": "m", "n_images": 4, "n_correctly_classified": 3,
        "n_per_map": {"f/inject": 2, "m/remove": 1}, "flip_fraction": {"inject": flip_inject, "remove": 0.0},
        "folded_fraction_mean": 0.0004, "maps": maps}))
    if regions:
        pd.DataFrame([{"class": c, "direction": d, "region": r, "mean_log_jacobian": v, "n_voxels": n}
                      for c, d in (("f", "inject"), ("m", "remove"))
                      for r, v, n in (("left_hippocampus", -0.123 if d == "inject" else 0.1, 40),
                                      ("right_ventricle", 0.456 if d == "inject" else -0.4, 30))]).to_csv(
            folder / "regions.tsv", sep="\t", index=False)
    card = mode_dir / "model" / "simulator" / "simulator_card.json"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(json.dumps({
        "format": "grazbids-counterfactual-simulator", "architecture": {"diffeomorphic": True, "field_downsample": 2},
        "training": {"epochs": 30, "batch_size": 2, "learning_rate": 0.001, "margin": 2.0, "smoothness_weight": 1.0,
                     "cycle_weight": 1.0, "seed": 42, "epochs_run": 30, "collapsed_epoch": None,
                     "final_epoch": {"epoch": 30, "loss": 2.5, "hinge": 1.234567, "flip_fraction": 0.5}}}))
    return folder
