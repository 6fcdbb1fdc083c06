"""Labels, class weights, participant-wise cross-validation folds and metrics."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def encode_labels(values: Sequence) -> tuple[np.ndarray, list[str]]:
    """Map label values to 0..K-1 (classes sorted as strings, so the order is stable)."""
    classes = sorted({str(v) for v in values})
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[str(v)] for v in values], dtype=np.int64), classes


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights N / (K * n_c): every class contributes equally."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [i for i in range(n_classes) if counts[i] == 0]
        raise ValueError(f"classes {missing} have no training sample")
    return (len(labels) / (n_classes * counts)).astype(np.float32)


def participant_folds(
    participants: Sequence[str], labels: np.ndarray, n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over participants: all scans of a participant share a fold.

    Returns (train_index, validation_index) arrays over the samples.
    """
    participants = np.asarray(participants)
    unique = sorted(set(participants.tolist()))
    if n_folds < 2 or n_folds > len(unique):
        raise ValueError(f"need 2 <= folds <= participants ({len(unique)}), got {n_folds}")
    label_of = {}
    for p, y in zip(participants, labels):
        if label_of.setdefault(p, int(y)) != int(y):
            raise ValueError(f"participant {p} has scans with different labels")
    rng = np.random.default_rng(seed)
    fold_of = {}
    # deal each class's shuffled participants round-robin, continuing where the last
    # class stopped, so folds are balanced in size and class mix
    offset = 0
    for cls in sorted(set(label_of.values())):
        members = [p for p in unique if label_of[p] == cls]
        rng.shuffle(members)
        for i, p in enumerate(members):
            fold_of[p] = (offset + i) % n_folds
        offset += len(members)
    sample_fold = np.array([fold_of[p] for p in participants])
    return [(np.flatnonzero(sample_fold != k), np.flatnonzero(sample_fold == k)) for k in range(n_folds)]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present in y_true."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in range(n_classes) if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else float("nan")
