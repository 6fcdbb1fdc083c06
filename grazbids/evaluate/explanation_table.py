"""Per-participant explanation metrics of out-of-fold heat maps, and their summaries.

The group level calls `participant_row` for every held-out sample with its heat map in
template space, then `summarise` per mode. The reference masks (GM/WM/CSF beside the
preprocessed image; for simulated or annotated datasets `desc-effect_mask`, the
ground-truth effect, and `desc-shortcut_mask`, a known confound) are found by
`grazbids.bids.patterns`.
"""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nb
import numpy as np

from ..bids.patterns import TISSUES
from .metrics import fraction_inside, fraction_per_tissue, pointing_game, roc_auc

COLUMN_DESCRIPTIONS = {
    "relevance_inside_brain": "fraction of positive relevance inside the brain mask",
    "relevance_gm": "fraction of positive relevance in grey matter (tissue probabilities renormalised inside the brain)",
    "relevance_wm": "fraction of positive relevance in white matter",
    "relevance_csf": "fraction of positive relevance in CSF",
    "relevance_outside_brain": "fraction of positive relevance outside the brain mask",
    "relevance_inside_effect": "fraction of positive relevance inside the ground-truth effect mask",
    "pointing_game_effect": "1 when the voxel of maximal relevance lies inside the effect mask",
    "roc_auc_effect": "voxel-wise ROC-AUC of relevance against the effect mask, inside the brain",
    "relevance_inside_shortcut": "fraction of positive relevance inside the known shortcut (confound) mask",
}

# Decision dependence (grazbids.explain.dependence): the region replaced, and by what.
DEPENDENCE_REGIONS = {
    "outside": "everything outside the brain mask",
    "guidance": "the --guidance-mask region",
    "shortcut": "the known shortcut (confound) mask",
    "effect": "the known effect mask",
}
DEPENDENCE_FILLS = {"zero": "set to 0", "mean": "set to the mean image of the training samples"}
for _region, _what in DEPENDENCE_REGIONS.items():
    for _fill, _how in DEPENDENCE_FILLS.items():
        COLUMN_DESCRIPTIONS[f"prob_change_{_region}_{_fill}"] = (
            f"change in the probability of the class predicted on the intact image when {_what} is {_how} "
            "(negative: the region supported the decision)")
        COLUMN_DESCRIPTIONS[f"flip_{_region}_{_fill}"] = (
            f"1 when the predicted class changes as {_what} is {_how} (its mean is the flip rate)")


def _load(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    data = np.asanyarray(nb.load(str(path)).dataobj, dtype=np.float64)
    if data.shape != shape:
        raise ValueError(f"{path}: grid {data.shape} differs from the heat map grid {shape}")
    return data


def participant_row(heatmap: np.ndarray, brain_mask: np.ndarray, tissues: dict[str, Path],
                    references: dict[str, Path]) -> dict[str, float]:
    """Where one heat map puts its positive relevance (NaN where a reference is missing)."""
    brain = np.asarray(brain_mask) > 0.5
    row = {"relevance_inside_brain": fraction_inside(heatmap, brain)}
    if set(tissues) == set(TISSUES):
        shares = fraction_per_tissue(heatmap, {t: _load(p, heatmap.shape) for t, p in tissues.items()}, brain)
        row.update({f"relevance_{t.lower()}": shares[t] for t in TISSUES})
    else:
        row.update({f"relevance_{t.lower()}": math.nan for t in TISSUES})
    row["relevance_outside_brain"] = fraction_inside(heatmap, ~brain)
    if "effect" in references:
        effect = _load(references["effect"], heatmap.shape) > 0.5
        has_effect = bool(effect.any())
        row["relevance_inside_effect"] = fraction_inside(heatmap, effect) if has_effect else math.nan
        row["pointing_game_effect"] = float(pointing_game(heatmap, effect)) if has_effect else math.nan
        row["roc_auc_effect"] = roc_auc(heatmap, effect, within=brain) if has_effect else math.nan
    if "shortcut" in references:
        shortcut = _load(references["shortcut"], heatmap.shape) > 0.5
        row["relevance_inside_shortcut"] = fraction_inside(heatmap, shortcut) if shortcut.any() else math.nan
    return row


def summarise(rows: list[dict], labels: list[str]) -> dict:
    """Mean of every metric column over all samples and per true class (NaNs ignored)."""
    columns = [c for c in COLUMN_DESCRIPTIONS if any(c in r for r in rows)]

    def means(selected: list[dict]) -> dict[str, float | None]:
        out = {}
        for column in columns:
            values = np.array([r.get(column, math.nan) for r in selected], dtype=np.float64)
            values = values[np.isfinite(values)]
            out[column] = float(values.mean()) if values.size else None
        return out

    return {
        "n_samples": len(rows),
        "mean": means(rows),
        "mean_per_true_class": {c: means([r for r, lab in zip(rows, labels) if lab == c]) for c in sorted(set(labels))},
    }
