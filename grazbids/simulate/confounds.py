"""Shortcut confounds: label-correlated features outside the brain.

* `marker`: a bright sphere (radius MARKER_RADIUS_MM, MARKER_INTENSITY x the brain
  median) fixed in scanner coordinates, right-anterior-superior of the brain: at MNI
  MARKER_POSITION_MNI when the head pose is the identity. Fixed in the scanner, it moves
  relative to the brain with every pose (as a capsule taped to a head coil would). The
  position was chosen on the template brain over 300 random poses (+-10 deg, +-10 mm):
  it stays >= 18 mm from the brain, inside the template's field of view, and inside the
  brain's bounding box plus 10 mm, the region grazbids' registration crops a
  skull-stripped scan to (a marker beyond it would vanish in preprocessing). If a
  (large) real brain would touch it, it is moved outward in 1-voxel steps and the actual
  position is recorded.
* `background`: BACKGROUND_OFFSET x the brain median added to every voxel outside the
  brain (before the noise). On a zero background this makes the background non-zero.
* `padding`: a reduced field of view, zero-filled to the standard matrix: every voxel
  further than PADDING_MARGIN_MM outside the brain's bounding box is exactly 0. Only
  visible on a noisy background (`--background noise`).
* `ghost`: an N/2 (Nyquist) ghost, as EPI and motion produce: the head, shifted by half
  the field of view along the anterior-posterior (phase-encoding) axis, at GHOST_INTENSITY
  x its signal, added outside the brain only (the confound stays outside). Faint and
  spread out: an artefact that intensity-scaled maps such as z+ hardly weigh.

Assignment: in a split with n_p patients and n_c controls and correlation c, exactly
round(c n_p) patients and round((1 - c) n_c) controls carry the confound (round half up).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .anatomy import HEAD_REFERENCE_MNI
from .deformation import Grid, points_in_box

SHORTCUTS = ("none", "marker", "background", "padding", "ghost")
MARKER_POSITION_MNI = (60.0, 57.0, 72.0)
MARKER_RADIUS_MM = 5.0
MARKER_INTENSITY = 2.0
BACKGROUND_OFFSET = 0.1
PADDING_MARGIN_MM = 10.0
GHOST_INTENSITY = 0.15
GHOST_LEVEL = 0.02  # ghost voxels above this (x the brain median) form the shortcut mask
_MAX_MARKER_STEPS = 40


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def confound_counts(n_patients: int, n_controls: int, correlation: float) -> tuple[int, int]:
    """(patients, controls) with the confound for a split (see module doc)."""
    return (round_half_up(correlation * n_patients),
            round_half_up((1.0 - correlation) * n_controls))


def assign_confound(diagnoses: list[str], correlation: float,
                    rng: np.random.Generator) -> list[bool]:
    """Which participants of one split carry the confound: exact counts, random members."""
    patients = [i for i, d in enumerate(diagnoses) if d == "patient"]
    controls = [i for i, d in enumerate(diagnoses) if d == "control"]
    k_patients, k_controls = confound_counts(len(patients), len(controls), correlation)
    chosen = set(rng.permutation(patients)[:k_patients].tolist())
    chosen |= set(rng.permutation(controls)[:k_controls].tolist())
    return [i in chosen for i in range(len(diagnoses))]


def marker_centre_scanner() -> np.ndarray:
    """The marker's scanner position (mm): MNI position relative to the pose pivot."""
    return np.asarray(MARKER_POSITION_MNI) - np.asarray(HEAD_REFERENCE_MNI)


def marker_extent_mm(voxel_mm: float) -> float:
    """Radius of everything the marker changes: its anti-aliased edge reaches half a
    voxel beyond MARKER_RADIUS_MM."""
    return MARKER_RADIUS_MM + 0.5 * voxel_mm


def place_marker(grid: Grid, points: np.ndarray, brain: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft marker profile (N,), its mask (N,, every voxel it changes) and its centre,
    clear of the brain: at least one voxel of background stays between the two."""
    voxel = float(grid.zooms.min())
    extent = marker_extent_mm(voxel)
    near_brain = ndi.binary_dilation(brain, iterations=1).reshape(-1)
    centre = marker_centre_scanner()
    step = voxel * centre / np.linalg.norm(centre)
    for _ in range(_MAX_MARKER_STEPS):
        near = points_in_box(points, centre, np.full(3, extent))
        distance = np.linalg.norm(points[:, near] - centre[:, None], axis=0)
        near, distance = near[distance < extent], distance[distance < extent]
        if not np.any(near_brain[near]):
            profile = np.zeros(points.shape[1], dtype=np.float32)
            profile[near] = np.clip((MARKER_RADIUS_MM - distance) / voxel + 0.5, 0.0, 1.0)
            mask = np.zeros(points.shape[1], dtype=bool)
            mask[near] = True
            return profile, mask, centre
        centre = centre + step
    raise RuntimeError("the shortcut marker cannot be placed outside the brain; "
                       "use a larger --fov")


def padding_mask(brain: np.ndarray, grid: Grid) -> np.ndarray:
    """Voxels further than PADDING_MARGIN_MM outside the brain's bounding box."""
    pad = np.ceil(PADDING_MARGIN_MM / grid.zooms).astype(int)
    inside = np.argwhere(brain)
    lower = inside.min(0) - pad
    upper = inside.max(0) + pad + 1
    keep = np.zeros(brain.shape, dtype=bool)
    keep[tuple(slice(max(int(a), 0), int(b)) for a, b in zip(lower, upper))] = True
    return ~keep


def ghost_signal(signal: np.ndarray) -> np.ndarray:
    """The N/2 ghost of ``signal`` (a 3D volume): shifted by half the field of view along
    axis 1 (anterior-posterior), scaled by GHOST_INTENSITY."""
    return GHOST_INTENSITY * np.roll(signal, signal.shape[1] // 2, axis=1)
