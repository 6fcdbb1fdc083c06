"""Scanner-independent intensity normalisation of T1w volumes.

The original Graz+ code divided by one global constant (450) that fits one scanner.
Here every image is divided by a high percentile of its own intensities inside the
brain mask, so scans of any scale land on a common range; negatives (interpolation
ringing) are clipped to 0 because the z+ rule at the input needs non-negative inputs.
The parameters are stored in the model card so inference repeats them exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class IntensityNormalisation:
    method: str = "percentile"
    percentile: float = 99.0
    within: str = "brain_mask"
    clip_max: float = 2.0  # cap bright outliers (vessels, fat) at 2x the reference

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityNormalisation":
        norm = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        if norm.method != "percentile":
            raise ValueError(f"unknown intensity normalisation {norm.method!r}")
        return norm

    def apply(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return float32 image / percentile(image[mask]), clipped to [0, clip_max]."""
        image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        inside = image[np.asarray(mask) > 0.5]
        inside = inside[inside > 0]
        if inside.size == 0:
            raise ValueError("cannot normalise intensities: no positive voxel inside the brain mask")
        reference = float(np.percentile(inside, self.percentile))
        return np.clip(image / reference, 0.0, self.clip_max).astype(np.float32)
