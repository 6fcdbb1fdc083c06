"""File-name patterns of the derivatives that grazbids reads back.

The participant level writes these names (through ``grazbids.bids.naming``); the group
level, the reports and the preflight checks find them again here, so a pattern is
spelled once.
"""
from __future__ import annotations

import re
from pathlib import Path

TISSUES = ("GM", "WM", "CSF")
REFERENCE_MASKS = ("effect", "shortcut")  # known effect / confound masks of simulated or annotated data
PREPROC_T1W = "_desc-preproc_T1w"
GUIDANCE_SPEC = re.compile(r"^(desc|label)-([a-zA-Z0-9]+)$")


def find_preprocessed_t1w(output_dir: Path, label: str, template: str, resolution: int) -> list[Path]:
    """A participant's ``*_space-<template>_res-<r>_desc-preproc_T1w.nii.gz`` outputs.

    ``res-2`` and ``res-02`` both count (TemplateFlow pads the index, fMRIPrep does not).
    """
    folder = Path(output_dir) / f"sub-{label}"
    if not folder.is_dir():
        return []
    pattern = re.compile(
        rf"^sub-{label}(_[a-z]+-[A-Za-z0-9]+)*_space-{re.escape(template)}"
        rf"_res-0*{resolution}{PREPROC_T1W}\.nii\.gz$"
    )
    return sorted(p for p in folder.rglob(f"*{PREPROC_T1W}.nii.gz") if pattern.match(p.name))


def entity(name: str, key: str) -> str | None:
    """Value of entity ``key`` in a BIDS file name (None when absent)."""
    match = re.search(rf"(?:^|_){key}-([a-zA-Z0-9]+)", name)
    return match.group(1) if match else None


def brain_mask_of(image: Path) -> Path:
    """The template-space brain mask written beside a preprocessed T1w."""
    return image.with_name(image.name.replace(PREPROC_T1W, "_desc-brain_mask"))


def tissue_maps(image: Path) -> dict[str, Path]:
    """GM/WM/CSF probability maps written beside a template-space preprocessed T1w."""
    found = {}
    for tissue in TISSUES:
        path = image.with_name(image.name.replace(PREPROC_T1W, f"_label-{tissue}_probseg"))
        if path.exists():
            found[tissue] = path
    return found


def reference_masks(bids_dir: Path, participant: str, session: str | None, template: str,
                    resolution: int) -> dict[str, Path]:
    """Template-space ``desc-effect_mask`` / ``desc-shortcut_mask`` derivatives of the input dataset."""
    found = {}
    derivatives = Path(bids_dir) / "derivatives"
    if not derivatives.is_dir():
        return found
    ses = f"_ses-{session}" if session else ""
    for name in REFERENCE_MASKS:
        pattern = f"sub-{participant}{ses}*_space-{template}_res-{resolution}_desc-{name}_mask.nii.gz"
        hits = sorted(derivatives.glob(f"*/sub-{participant}/**/{pattern}"))
        if hits:
            found[name] = hits[0]
    return found


def guidance_mask_names(spec: str, participant: str, session: str | None, template: str,
                        resolution: int) -> list[str]:
    """Glob patterns of the mask ``--guidance-mask`` names: ``desc-<x>`` finds
    ``*_desc-<x>_mask.nii.gz``, ``label-<x>`` ``*_label-<x>_probseg.nii.gz`` or ``_mask``.
    ValueError for a malformed ``spec``."""
    match = GUIDANCE_SPEC.match(spec)
    if not match:
        raise ValueError(f"--guidance-mask {spec!r}: use desc-<label> (e.g. desc-lesion) or label-<label> "
                         "(e.g. label-GM)")
    key, value = match.groups()
    suffixes = ("mask",) if key == "desc" else ("probseg", "mask")
    ses = f"_ses-{session}" if session else ""
    return [f"sub-{participant}{ses}*_space-{template}_res-{resolution}_{key}-{value}_{suffix}.nii.gz"
            for suffix in suffixes]
