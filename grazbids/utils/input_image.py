"""`--input-image {brain,head}`: what the network sees of a template-space T1w.

The participant level writes a raw head's `desc-preproc_T1w` as the bias-corrected
*head* (`SkullStripped: false`, as fMRIPrep does) and its `desc-brain_mask` as the
participant's extraction mask. The Graz+ relevance mask is that brain mask either way;
only the image changes:

* ``brain`` (default): a head is multiplied by its brain mask; an image that is already
  brain-extracted (`SkullStripped: true`, e.g. ds002748) is used as it is, so results
  on such datasets do not change (its template-space mask is the template's, which
  must not cut the participant's own brain).
* ``head``: the image as written (whole head for raw inputs; the brain for
  brain-extracted inputs, which have nothing else).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

INPUT_IMAGES = ("brain", "head")


def is_skull_stripped(image_path: str | Path) -> bool:
    """`SkullStripped` of a written `desc-preproc_T1w` (its JSON sidecar); a missing
    sidecar or field counts as brain-extracted (outputs written before heads existed)."""
    sidecar = Path(re.sub(r"\.nii(\.gz)?$", ".json", str(image_path)))
    try:
        return bool(json.loads(sidecar.read_text()).get("SkullStripped", True))
    except FileNotFoundError:
        return True
    except (OSError, ValueError) as err:
        raise ValueError(f"{sidecar}: unreadable JSON sidecar ({err})") from None


def network_input(image: np.ndarray, brain_mask: np.ndarray, *, input_image: str,
                  skull_stripped: bool) -> np.ndarray:
    """The array the network gets for `input_image` (see the module docstring)."""
    if input_image not in INPUT_IMAGES:
        raise ValueError(f"input_image must be one of {INPUT_IMAGES}, not {input_image!r}")
    if input_image == "head" or skull_stripped:
        return image
    return image * (np.asarray(brain_mask) > 0.5)
