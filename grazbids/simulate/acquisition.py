"""Scanner-side effects on the output grid: bias field, Rician noise, intensity scaling.

Intensities are in units of the source brain's median until `to_scanner_units`, which
multiplies by BASE_INTENSITY and the participant's global scale and rounds to int16 (as
scanners store magnitude images).
"""
from __future__ import annotations

import numpy as np

from .deformation import smooth_random_field

BASE_INTENSITY = 1000.0  # int16 value of the brain median at a global scale of 1
BIAS_CONTROL_SPACING_MM = 80.0  # a smooth coil profile: a few control points per axis


def bias_field(rng: np.random.Generator, shape, voxel_mm: float, strength: float) -> np.ndarray:
    """Multiplicative field exp(b), b a smooth random field scaled so max |b| = strength."""
    if strength <= 0:
        return np.ones(shape, dtype=np.float32)
    log_field = smooth_random_field(rng, shape, voxel_mm, BIAS_CONTROL_SPACING_MM)[0]
    log_field *= strength / max(np.abs(log_field).max(), 1e-12)
    return np.exp(log_field).astype(np.float32)


def rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation `sigma`.

    The two noise arrays are always drawn for the whole grid, so the draws of a
    participant do not depend on the image content (an effect changes only its voxels)."""
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32)
    if sigma <= 0:
        return signal.astype(np.float32)
    return np.hypot(signal + sigma * real, sigma * imaginary).astype(np.float32)


def random_global_scale(rng: np.random.Generator, low: float, high: float) -> float:
    """Log-uniform scanner gain in [low, high]."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def to_scanner_units(image: np.ndarray, scale: float) -> np.ndarray:
    """Relative intensities -> int16 (rounded, clipped to the int16 range)."""
    values = np.rint(image * (BASE_INTENSITY * scale))
    return np.clip(values, 0, np.iinfo(np.int16).max).astype(np.int16)
