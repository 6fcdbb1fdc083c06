"""Class weights, participant-wise folds, balanced accuracy."""
import numpy as np
import pytest

from grazbids.engine import balanced_accuracy, class_weights, encode_labels, participant_folds


def test_class_weights_inverse_frequency():
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    np.testing.assert_allclose(w, [4 / 6, 4 / 2])
    # every class carries the same total weight
    assert w[0] * 3 == pytest.approx(w[1] * 1)
    with pytest.raises(ValueError, match="no training sample"):
        class_weights(np.array([0, 0]), 2)


def test_folds_never_split_a_participant():
    participants = [f"sub-{i // 2:02d}" for i in range(40)]  # two scans per participant
    labels = np.array([(i // 2) % 3 == 0 for i in range(40)], dtype=int)
    folds = participant_folds(participants, labels, 5, seed=1)
    seen = []
    for train, val in folds:
        train_p = {participants[i] for i in train}
        val_p = {participants[i] for i in val}
        assert not train_p & val_p
        assert len(train) + len(val) == 40
        assert set(labels[val]) == {0, 1}, "stratified: both classes in every fold"
        seen += list(val)
    assert sorted(seen) == list(range(40)), "each sample validated exactly once"
    assert participant_folds(participants, labels, 5, seed=1)[0][1].tolist() == folds[0][1].tolist()


def test_folds_reject_bad_requests():
    with pytest.raises(ValueError, match="folds"):
        participant_folds(["a", "b"], np.array([0, 1]), 3, seed=0)
    with pytest.raises(ValueError, match="different labels"):
        participant_folds(["a", "a", "b"], np.array([0, 1, 1]), 2, seed=0)


def test_balanced_accuracy_and_labels():
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2) == 0.5
    assert balanced_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]), 2) == 0.75
    codes, classes = encode_labels(["m", "f", "f", "m"])
    assert classes == ["f", "m"] and codes.tolist() == [1, 0, 0, 1]
