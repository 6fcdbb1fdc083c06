"""Explanation metrics on hand-made maps with known answers."""
import numpy as np
import pytest

from grazbids.evaluate import metrics


def _maps():
    heat = np.zeros((4, 4, 4))
    heat[0, 0, 0] = 3.0  # inside the target
    heat[3, 3, 3] = 1.0  # outside the brain
    heat[1, 1, 1] = -2.0  # negative relevance is ignored by the fractions
    brain = np.zeros((4, 4, 4))
    brain[:3, :3, :3] = 1
    target = np.zeros((4, 4, 4))
    target[0, 0, 0] = 1
    return heat, brain, target


def test_fraction_inside_and_pointing_game():
    heat, brain, target = _maps()
    assert metrics.fraction_inside(heat, brain) == pytest.approx(0.75)
    assert metrics.fraction_inside(heat, target) == pytest.approx(0.75)
    assert metrics.pointing_game(heat, target)
    assert not metrics.pointing_game(heat, 1 - target)
    assert np.isnan(metrics.fraction_inside(np.zeros((2, 2)), np.ones((2, 2))))
    assert not metrics.pointing_game(np.zeros((2, 2)), np.ones((2, 2)))  # a dead network's empty map


def test_fraction_per_tissue_adds_up():
    heat, brain, _ = _maps()
    gm = np.zeros_like(brain)
    gm[0, 0, 0] = 0.5
    wm = np.zeros_like(brain)
    wm[0, 0, 0] = 0.5
    csf = brain - gm - wm
    shares = metrics.fraction_per_tissue(heat, {"GM": gm, "WM": wm, "CSF": csf}, brain)
    assert shares == pytest.approx({"GM": 0.375, "WM": 0.375, "CSF": 0.0, "outside": 0.25})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_roc_auc_known_values():
    target = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), target) == 1.0
    assert metrics.roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), target) == 0.0
    assert metrics.roc_auc(np.array([1.0, 1.0, 1.0, 1.0]), target) == 0.5
    assert metrics.roc_auc(np.array([0.1, 0.9, 0.5, 0.8]), target) == 0.5
    assert np.isnan(metrics.roc_auc(np.ones(3), np.zeros(3)))


def test_top_k_overlap_is_true_dice_without_background():
    a = np.arange(100, dtype=float)
    b = a.copy()
    assert metrics.top_k_overlap(a, b, 0.1) == {"dice": 1.0, "iou": 1.0}
    b = a[::-1].copy()
    assert metrics.top_k_overlap(a, b, 0.1) == {"dice": 0.0, "iou": 0.0}
    c = a.copy()
    c[90:95] = 0  # half of a's top 10 drops out
    overlap = metrics.top_k_overlap(a, c, 0.1)
    assert overlap["dice"] == pytest.approx(0.5) and overlap["iou"] == pytest.approx(5 / 15)


def test_spearman():
    a = np.arange(10.0)
    assert metrics.spearman(a, a ** 3) == pytest.approx(1.0)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    within = np.zeros(10)
    within[:5] = 1
    assert metrics.spearman(a, np.r_[a[:5], -a[5:]], within) == pytest.approx(1.0)
