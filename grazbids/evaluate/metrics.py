"""Explanation metrics for heat maps: where the relevance is, and how maps agree.

All functions take numpy arrays on one grid. "Positive relevance" is max(R, 0): z+ maps
are non-negative anyway, other methods (epsilon LRP, gradients) are not.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def _positive(heatmap: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)


def fraction_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive relevance that lies inside ``mask`` (binary or probabilistic)."""
    positive = _positive(heatmap)
    total = positive.sum()
    if total == 0:
        return float("nan")
    return float((positive * np.asarray(mask, dtype=np.float64)).sum() / total)


def fraction_per_tissue(heatmap: np.ndarray, tissues: dict[str, np.ndarray], brain_mask: np.ndarray) -> dict[str, float]:
    """Positive relevance per tissue probability map (e.g. GM/WM/CSF) and outside the brain.

    Probabilities are renormalised to sum to 1 inside the brain, so the shares add up to 1
    (up to relevance on brain voxels where every tissue probability is 0).
    """
    brain = np.asarray(brain_mask) > 0.5
    probs = {name: np.where(brain, np.clip(np.asarray(p, dtype=np.float64), 0, None), 0) for name, p in tissues.items()}
    norm = sum(probs.values())
    shares = {}
    for name, p in probs.items():
        weight = np.divide(p, norm, out=np.zeros_like(p), where=norm > 0)
        shares[name] = fraction_inside(heatmap, weight)
    shares["outside"] = fraction_inside(heatmap, ~brain)
    return shares


def pointing_game(heatmap: np.ndarray, target_mask: np.ndarray) -> bool:
    """Whether the voxel of maximal relevance lies inside the target (ties: any of them).

    A map without positive relevance (e.g. of a network whose units all died) points
    nowhere: False, not "every voxel is the maximum"."""
    heatmap = np.asarray(heatmap)
    if not np.any(heatmap > 0):
        return False
    peak = heatmap == heatmap.max()
    return bool(np.any(peak & (np.asarray(target_mask) > 0.5)))


def roc_auc(heatmap: np.ndarray, target_mask: np.ndarray, within: np.ndarray | None = None) -> float:
    """Voxel-wise ROC-AUC of relevance as a detector of the target (Mann-Whitney U)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    target = np.asarray(target_mask) > 0.5
    keep = np.ones(heatmap.shape, bool) if within is None else np.asarray(within) > 0.5
    scores, labels = heatmap[keep], target[keep]
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def top_fraction_mask(heatmap: np.ndarray, fraction: float, within: np.ndarray | None = None) -> np.ndarray:
    """The ``fraction`` (0-1) of voxels with the highest relevance (inside ``within``)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    keep = np.ones(heatmap.shape, bool) if within is None else np.asarray(within) > 0.5
    values = heatmap[keep]
    k = max(1, int(round(fraction * values.size)))
    order = np.argsort(-values, kind="stable")[:k]
    selected = np.zeros(values.size, bool)
    selected[order] = True
    out = np.zeros(heatmap.shape, bool)
    out[keep] = selected
    return out


def top_k_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1, within: np.ndarray | None = None) -> dict[str, float]:
    """True Dice and IoU of the top-``fraction`` voxels of two maps (background excluded)."""
    ta, tb = top_fraction_mask(a, fraction, within), top_fraction_mask(b, fraction, within)
    inter = np.logical_and(ta, tb).sum()
    union = np.logical_or(ta, tb).sum()
    return {"dice": float(2 * inter / (ta.sum() + tb.sum())), "iou": float(inter / union)}


def spearman(a: np.ndarray, b: np.ndarray, within: np.ndarray | None = None) -> float:
    """Rank correlation of two maps over the voxels in ``within`` (default: all)."""
    keep = np.ones(np.shape(a), bool) if within is None else np.asarray(within) > 0.5
    return float(stats.spearmanr(np.asarray(a)[keep], np.asarray(b)[keep]).statistic)
