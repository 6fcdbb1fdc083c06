"""The training images of a simulator: the classifier's own preprocessed cohort.

Reads the template-space T1w and brain masks the participant level wrote (as the group
level does) and the class of each participant from participants.tsv, in the column the
classifier was trained on; labels are indexed as the classifier's classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..engine.normalize import IntensityNormalisation
from ..utils.input_image import is_skull_stripped, network_input


class CohortError(ValueError):
    """No usable training images (message names the folder/file)."""


def load_training_images(card: dict, bids_dir: str | Path, derivatives_dir: str | Path,
                         participants: list[str] | None = None):
    """(images (N,1,D,H,W), masks (N,1,D,H,W), labels (N,), participant labels) for the card's
    target column; images normalised as the card says."""
    import nibabel as nb

    # the group level's sample discovery
    from ..group.cohort import GroupInputError, find_samples, read_targets

    column = card["target_column"]
    try:
        targets = read_targets(bids_dir, column)
    except GroupInputError as err:
        raise CohortError(str(err)) from None
    chosen = [p.removeprefix("sub-") for p in participants] if participants else sorted(targets)
    template, resolution = card["input"]["template"], card["input"]["resolution"]
    try:
        samples = find_samples(derivatives_dir, chosen, targets, template, resolution, column)
    except GroupInputError as err:
        raise CohortError(str(err)) from None
    classes = [str(c) for c in card["classes"]]
    samples = [s for s in samples if str(s.label) in classes]
    if not samples:
        raise CohortError(f"{derivatives_dir}: no preprocessed T1w (space-{template}_res-{resolution}) of a participant "
                          f"with a {column!r} value in {classes}; run the participant level first")
    norm = IntensityNormalisation.from_dict(card["input"]["intensity_normalisation"])
    grid = tuple(card["input"]["grid_shape"])
    images, masks = [], []
    for s in samples:
        mask = (np.asanyarray(nb.load(str(s.mask)).dataobj) > 0.5).astype(np.float32)
        data = np.asanyarray(nb.load(str(s.image)).dataobj)
        if data.shape != grid or mask.shape != grid:
            raise CohortError(f"{s.image}: grid {data.shape} differs from the model's {grid}")
        # the image as in training: a raw head is masked to its brain unless the model saw heads
        data = network_input(data, mask, input_image=card["input"].get("image", "brain"),
                             skull_stripped=is_skull_stripped(s.image))
        images.append(norm.apply(data, mask))
        masks.append(mask)
    labels = torch.tensor([classes.index(str(s.label)) for s in samples])
    return (torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(masks)[:, None]), labels,
            [s.participant for s in samples])
