"""The group level's cohort: which preprocessed images enter training, with which label,
and their loading into one :class:`grazbids.engine.TrainingData`."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from ..bids.participants import read_target_values
from ..bids.patterns import (
    brain_mask_of, entity, find_preprocessed_t1w, guidance_mask_names, reference_masks, tissue_maps,
)
from ..engine import IntensityNormalisation, TrainingData, encode_labels
from ..exitcodes import ExitCode, GrazbidsError
from ..utils.input_image import is_skull_stripped, network_input

LOG = logging.getLogger("grazbids.group")
NORMALISATION = IntensityNormalisation()


class GroupInputError(GrazbidsError):
    """Unusable group-level input (the message names the file and the problem); exit 65
    unless the cause says otherwise (e.g. 66 for a missing participants.tsv)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_DATA):
        super().__init__(code, message)


@dataclass
class Sample:
    participant: str
    session: str | None
    image: Path
    mask: Path
    label: str
    tissues: dict[str, Path] = field(default_factory=dict)  # GM/WM/CSF probabilities in template space
    references: dict[str, Path] = field(default_factory=dict)  # known effect/shortcut masks (derivatives)


def read_targets(bids_dir: str | Path, target_column: str) -> dict[str, str]:
    """participant label (without sub-) -> target value; n/a and empty values left out."""
    try:
        return read_target_values(Path(bids_dir), target_column)
    except GrazbidsError as err:
        raise GroupInputError(str(err), err.code) from None


def find_samples(
    output_dir: str | Path, participants: list[str], targets: dict[str, str], template: str, resolution: int,
    target_column: str = "target", bids_dir: str | Path | None = None,
) -> list[Sample]:
    """Preprocessed T1w + brain mask in template space, one sample per session/run."""
    samples = []
    for participant in participants:
        if participant not in targets:
            LOG.warning("sub-%s: no %s value in participants.tsv; left out of training", participant, target_column)
            continue
        for image in find_preprocessed_t1w(Path(output_dir), participant, template, resolution):
            mask = brain_mask_of(image)
            if not mask.exists():
                raise GroupInputError(f"{image}: brain mask {mask.name} is missing; rerun the participant level")
            session = entity(image.name, "ses")
            references = reference_masks(Path(bids_dir), participant, session, template, resolution) if bids_dir else {}
            samples.append(Sample(participant, session, image, mask, targets[participant],
                                  tissue_maps(image), references))
    return samples


def find_guidance_masks(samples: list[Sample], spec: str, *, bids_dir, output_dir, template: str,
                        resolution: int) -> list[Path]:
    """Per sample, the template-space mask named by ``spec`` (see
    :func:`grazbids.bids.patterns.guidance_mask_names`); searched in output_dir (grazbids'
    own masks) and in the input dataset's derivatives."""
    roots = [Path(output_dir)] + sorted(p for p in (Path(bids_dir) / "derivatives").glob("*") if p.is_dir())
    found = []
    for s in samples:
        try:
            names = guidance_mask_names(spec, s.participant, s.session, template, resolution)
        except ValueError as err:
            raise GroupInputError(str(err)) from None
        hits = [hit for root in roots for name in names for hit in sorted(root.glob(f"sub-{s.participant}/**/{name}"))]
        if not hits:
            ses = f"_ses-{s.session}" if s.session else ""
            raise GroupInputError(
                f"sub-{s.participant}{ses}: no guidance mask {names[0]} in {output_dir} or "
                f"{Path(bids_dir) / 'derivatives'}/*; --guidance-mask needs one per participant in template space"
            )
        found.append(hits[0])
    return found


def load_cohort(samples: list[Sample], guidance: list[Path] | None = None,
                input_image: str = "brain") -> tuple[TrainingData, list[str], np.ndarray]:
    labels, classes = encode_labels([s.label for s in samples])
    if len(classes) < 2:
        raise GroupInputError(f"the target has only one class ({classes}) among the selected participants")
    images, masks, affine = [], [], None
    for k, s in enumerate(samples):
        img = nb.load(str(s.image))
        mask = (np.asanyarray(nb.load(str(s.mask)).dataobj) > 0.5).astype(np.float32)
        # --input-image: a raw head is masked to its brain unless the network is to see the head
        image = network_input(np.asanyarray(img.dataobj), mask, input_image=input_image,
                              skull_stripped=is_skull_stripped(s.image))
        images.append(NORMALISATION.apply(image, mask))
        if guidance is not None:  # channel 1: the guidance mask, kept inside the brain
            extra = np.asanyarray(nb.load(str(guidance[k])).dataobj, dtype=np.float32)
            if extra.shape != mask.shape:
                raise GroupInputError(f"{guidance[k]}: grid {extra.shape} differs from the brain mask's {mask.shape}")
            mask = np.stack([mask, np.clip(extra, 0, 1) * mask])
        masks.append(mask)
        affine = img.affine if affine is None else affine
    if len({im.shape for im in images}) != 1:
        raise GroupInputError("preprocessed images have different grids; rerun the participant level with one --template/--resolution")
    data = TrainingData(
        torch.from_numpy(np.stack(images)[:, None]),
        torch.from_numpy(np.stack(masks) if guidance is not None else np.stack(masks)[:, None]),
        torch.from_numpy(labels), len(classes),
    )
    return data, classes, affine


def cohort_key(samples: list[Sample], cv_folds: int, template: str, resolution: int,
               guidance: list[Path] | None = None) -> str:
    """Names the checkpoint folder: a checkpoint only resumes for the same cohort and folds.

    (The trainer's own fingerprint covers the settings and the training indices, not which
    images those indices point to.)
    """
    content = [[str(Path(s.image).resolve()), s.image.stat().st_mtime_ns, s.label] for s in samples]
    content += [cv_folds, template, resolution]  # a rewritten image (new mtime) starts afresh
    content += [[str(Path(p).resolve()), Path(p).stat().st_mtime_ns] for p in guidance or []]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]
