"""Simulate one participant's T1w scan and its ground-truth masks.

For every output voxel (scanner point y) one chain of maps gives the source point to
sample, so the whole scan is a single cubic-spline resampling:

    y -> y + u(y)               smooth random anatomical deformation (B-spline, scanner frame)
      -> m = (P A)^-1 (...)     head pose P (rigid) and source registration A: MNI mm
      -> m' = effect(m)         atrophy: backward map to the healthy anatomy
      -> source voxel of A m'

Then, on the output grid: lesion intensity change (at m), shortcut confound, bias field,
Rician noise, background handling, global scanner scale, int16. Every random draw comes
from its own stream seeded by (seed, participant index, stream), so a participant's
pose, anatomy, bias and noise do not depend on its diagnosis or confound: a patient
differs from the same participant simulated as a control only where the effect is.

Ground truth in template space is the same effect function on the template grid, and
the shortcut's position mapped through P A; both ignore u, the small non-affine
individual deformation that an affine registration cannot undo either.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .acquisition import bias_field, random_global_scale, rician_noise, to_scanner_units
from .anatomy import SourceAnatomy
from .config import SimulationConfig
from .confounds import (BACKGROUND_OFFSET, GHOST_LEVEL, MARKER_INTENSITY, ghost_signal, marker_extent_mm,
                        padding_mask, place_marker)
from .deformation import Grid, Pose, apply_affine, smooth_random_field
from .effects import AtrophyEffect, Effect, LesionEffect
from .regions import get_region

ANATOMY_CONTROL_SPACING_MM = 32.0
_STREAMS = {"pose": 1, "anatomy": 2, "bias": 3, "noise": 4, "scale": 5, "lesion": 6}


@dataclass(frozen=True)
class ParticipantPlan:
    index: int  # 0-based position in label order
    label: str  # without "sub-"
    diagnosis: str  # control | patient
    shortcut: bool  # confound present
    split: str  # train | test
    source: str  # "template" or the source scan's path


@dataclass
class SimulatedScan:
    t1w: np.ndarray  # int16, output grid
    brain: np.ndarray  # bool, output grid
    effect_native: np.ndarray  # bool, output grid
    effect_template: np.ndarray  # bool, template grid
    shortcut_native: np.ndarray  # bool, output grid
    shortcut_template: np.ndarray  # bool, template grid
    details: dict = field(default_factory=dict)


def participant_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, _STREAMS[stream]])


def build_effect(config: SimulationConfig, plan: ParticipantPlan) -> Effect | None:
    """The participant's effect (None for controls and for --effect none)."""
    if plan.diagnosis != "patient" or config.effect == "none":
        return None
    regions = [get_region(name) for name in config.regions]
    if config.effect == "atrophy":
        return AtrophyEffect.from_regions(regions, config.strength)
    return LesionEffect.from_regions(regions, config.strength, config.effect_contrast,
                                     config.lesion_shape,
                                     participant_rng(config.seed, plan.index, "lesion"))


def _sample(volume: np.ndarray, index: np.ndarray, order: int) -> np.ndarray:
    return ndi.map_coordinates(volume, index, order=order, prefilter=False, mode="constant",
                               cval=0.0, output=np.float32)


def simulate_participant(plan: ParticipantPlan, source: SourceAnatomy, config: SimulationConfig,
                         grid: Grid, template_grid: Grid, template_brain: np.ndarray
                         ) -> SimulatedScan:
    seed, index = config.seed, plan.index
    voxel = float(config.voxel_size)
    points = grid.points

    # Geometry: one chain from scanner points to source voxels (module doc).
    pose = Pose.random(participant_rng(seed, index, "pose"), config.max_rotation_deg,
                       config.max_translation_mm)
    scanner_from_mni = pose.matrix(source.head_centre) @ source.mni_to_source
    deformation = smooth_random_field(participant_rng(seed, index, "anatomy"), grid.shape,
                                      voxel, ANATOMY_CONTROL_SPACING_MM, components=3)
    mni = apply_affine(np.linalg.inv(scanner_from_mni),
                       points + config.deformation_mm * deformation.reshape(3, -1))
    del deformation
    effect = build_effect(config, plan)
    healthy, factor, effect_native = (effect.evaluate(mni) if effect is not None
                                      else (mni, None, np.zeros(mni.shape[1], dtype=bool)))
    del mni
    source_index = apply_affine(np.linalg.inv(source.affine) @ source.mni_to_source, healthy)
    del healthy
    signal = np.maximum(_sample(source.coefficients, source_index, order=3), 0.0)
    brain = _sample(source.brain, source_index, order=1) > 0.5
    del source_index
    if factor is not None:
        signal *= factor.astype(np.float32)
    effect_native &= brain
    effect_template = np.zeros(template_grid.shape, dtype=bool)
    if effect is not None:
        effect_template = (effect.mask(template_grid.points).reshape(template_grid.shape)
                           & template_brain)
    brain = brain.reshape(grid.shape)
    effect_native = effect_native.reshape(grid.shape)

    # Shortcut confound (outside the brain).
    details = {"pose": pose}
    shortcut = np.zeros(brain.shape, dtype=bool)
    keep = brain.copy()  # voxels that carry signal on a zero background
    marker_centre = None
    if plan.shortcut and config.shortcut == "marker":
        profile, shortcut_flat, marker_centre = place_marker(grid, points, brain)
        signal = np.maximum(signal, MARKER_INTENSITY * profile.astype(np.float32))
        shortcut = shortcut_flat.reshape(grid.shape)
        keep |= shortcut
        details["marker_centre_mm"] = marker_centre
    elif plan.shortcut and config.shortcut == "background":
        shortcut = ~brain
        signal += np.float32(BACKGROUND_OFFSET) * shortcut.reshape(-1)
        keep[:] = True
    elif plan.shortcut and config.shortcut == "padding":
        shortcut = padding_mask(brain, grid)
    elif plan.shortcut and config.shortcut == "ghost":
        ghost = ghost_signal(signal.reshape(grid.shape))
        shortcut = (ghost > GHOST_LEVEL) & ~brain
        signal += np.where(shortcut, ghost, 0.0).reshape(-1).astype(np.float32)
        keep |= shortcut
    del points

    # Acquisition.
    signal = signal.reshape(grid.shape)
    signal *= bias_field(participant_rng(seed, index, "bias"), grid.shape, voxel,
                         config.bias_strength)
    image = rician_noise(signal, config.noise, participant_rng(seed, index, "noise"))
    if config.background == "zero":
        image[~keep] = 0.0
    if plan.shortcut and config.shortcut == "padding":
        image[shortcut] = 0.0
    scale = random_global_scale(participant_rng(seed, index, "scale"), *config.intensity_scale)
    details["intensity_scale"] = scale

    return SimulatedScan(
        t1w=to_scanner_units(image, scale),
        brain=brain,
        effect_native=effect_native,
        effect_template=effect_template,
        shortcut_native=shortcut,
        shortcut_template=_shortcut_in_template(shortcut, marker_centre, scanner_from_mni,
                                                grid, template_grid) & ~template_brain,
        details=details,
    )


def _shortcut_in_template(shortcut: np.ndarray, marker_centre: np.ndarray | None,
                          scanner_from_mni: np.ndarray, grid: Grid, template_grid: Grid
                          ) -> np.ndarray:
    """The confound's voxels on the template grid, through the known pose and affine:
    the marker sphere exactly, other confounds by nearest-neighbour lookup (the caller
    removes the template brain: at coarse voxels the lookup spills over its edge)."""
    if not shortcut.any():
        return np.zeros(template_grid.shape, dtype=bool)
    scanner = apply_affine(scanner_from_mni, template_grid.points)
    if marker_centre is not None:
        extent = marker_extent_mm(float(grid.zooms.min()))
        inside = np.linalg.norm(scanner - marker_centre[:, None], axis=0) < extent
    else:
        inside = _sample(shortcut.astype(np.float32), grid.to_index(scanner), order=0) > 0.5
    return inside.reshape(template_grid.shape)
