"""Source anatomies: the embedded template brain, or real skull-stripped T1w scans.

A source is kept in its own physical frame (so real heads keep their size) together with
`mni_to_source`, the affine that maps MNI152NLin2009aSym coordinates onto it: identity
for the template, one antspyx affine registration (grazbids' `RegisterToTemplate`,
rigid + affine with the brain-mask term, one ITK thread so it is reproducible) per real
scan. Effects are placed at MNI coordinates through that affine.

Intensities are divided by the median inside the brain, so every source has the same
units; for output voxels coarser than the source's, the source is Gaussian-filtered
first (anti-aliasing, the FWHM that takes one voxel size to the other).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage as ndi

from ..templates import TemplateFiles
from .deformation import apply_affine

TEMPLATE_SOURCE = "template"
HEAD_REFERENCE_MNI = (0.0, -18.0, 22.0)  # centre of the template's res-2 field of view
_FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))
_CROP_MARGIN_MM = 10.0
_MIN_BACKGROUND_FRACTION = 0.2  # a skull-stripped scan is zero in much of its field of view


class UnusableAnatomyError(ValueError):
    """A source scan exists but cannot be used (not 3D, not skull-stripped, ...)."""


@dataclass
class SourceAnatomy:
    """One source brain, ready for resampling (see module doc)."""

    name: str
    coefficients: np.ndarray  # cubic spline coefficients, intensities / brain median
    brain: np.ndarray  # float32 0/1 brain mask on the same grid
    affine: np.ndarray  # voxel -> source mm (RAS)
    mni_to_source: np.ndarray  # 4x4, MNI mm -> source mm

    @property
    def head_centre(self) -> np.ndarray:
        """Source-frame point of the template's field-of-view centre: the pose pivot."""
        return apply_affine(self.mni_to_source, np.asarray(HEAD_REFERENCE_MNI)[:, None])[:, 0]


# --------------------------------------------------------------------------- inputs
def find_anatomy_files(paths: list[str | Path]) -> list[Path]:
    """Expand the --anatomy arguments: files as given, BIDS folders to their T1w images.

    Raises FileNotFoundError naming a path that does not exist or a folder without T1w."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            scans = sorted(p for pattern in ("sub-*/anat/sub-*_T1w.nii*",
                                             "sub-*/ses-*/anat/sub-*_T1w.nii*")
                           for p in path.glob(pattern))
            if not scans:
                raise FileNotFoundError(f"--anatomy {path}: a folder without "
                                        "sub-*/[ses-*/]anat/*_T1w.nii[.gz] images")
            found += scans
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"--anatomy {path}: no such file or folder")
    return found


def check_anatomy_header(path: Path) -> None:
    """A readable NIfTI with one 3D volume, else UnusableAnatomyError."""
    try:
        img = nb.load(path)
    except Exception as exc:  # nibabel raises many types for non-images
        raise UnusableAnatomyError(f"--anatomy {path}: not a readable NIfTI image ({exc})") from None
    shape = img.shape
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise UnusableAnatomyError(
            f"--anatomy {path}: a {len(shape)}D image of shape {shape}; a single 3D "
            "T1w volume is needed")


def _load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nb.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    return np.nan_to_num(data), img.affine


def _brain_mask(data: np.ndarray, path: Path) -> np.ndarray:
    """The brain of a skull-stripped scan (grazbids' definition: signal > 0, largest
    component, holes filled), checked for a plausible volume and a zero background."""
    from ..interfaces.masks import brain_mask_from_t1w

    if (data > 0).mean() > 1.0 - _MIN_BACKGROUND_FRACTION:
        raise UnusableAnatomyError(
            f"--anatomy {path}: the background is not zero, so the scan does not look "
            "skull-stripped (the simulator needs brain-extracted T1w images)")
    return brain_mask_from_t1w(data)


def _check_volume(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    from ..interfaces.registration import MAX_BRAIN_VOLUME_ML, MIN_BRAIN_VOLUME_ML

    volume = mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000.0
    if not MIN_BRAIN_VOLUME_ML <= volume <= MAX_BRAIN_VOLUME_ML:
        raise UnusableAnatomyError(
            f"--anatomy {path}: brain volume {volume:.0f} ml is not plausible "
            f"({MIN_BRAIN_VOLUME_ML:g}-{MAX_BRAIN_VOLUME_ML:g} ml); is it a skull-stripped T1w?")


# --------------------------------------------------------------------------- registration
def register_to_template(path: Path, template: TemplateFiles) -> np.ndarray:
    """4x4 affine MNI mm -> source mm (RAS) of a skull-stripped scan, by antspyx.

    Runs grazbids' RegisterToTemplate (affine) on a copy whose qform equals the sform
    nibabel reads (ITK reads the qform), then maps four points through the forward
    transform (which maps template points to source points) and solves for the affine."""
    import ants
    import pandas as pd

    from ..interfaces.registration import RegisterToTemplate

    data, affine = _load_volume(path)
    mask = _brain_mask(data, path)
    _check_volume(mask, affine, path)
    with tempfile.TemporaryDirectory(prefix="grazbids-simulate-reg-") as tmp:
        moving = Path(tmp) / "source_T1w.nii.gz"
        moving_mask = Path(tmp) / "source_brain_mask.nii.gz"
        for array, target in ((data, moving), (mask.astype(np.uint8), moving_mask)):
            img = nb.Nifti1Image(array, affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nb.save(img, target)
        result = RegisterToTemplate(
            moving_image=str(moving), moving_mask=str(moving_mask),
            fixed_image=str(template.t1w), fixed_mask=str(template.brain_mask),
            registration="affine", num_threads=1, random_seed=42,
        ).run(cwd=tmp)
        mni_points = np.array([[0, 0, 0], [60, 0, 0], [0, 60, 0], [0, 0, 60]], dtype=float)
        lps = mni_points * [-1, -1, 1]  # ITK works in LPS
        mapped = ants.apply_transforms_to_points(
            3, pd.DataFrame(lps, columns=["x", "y", "z"]),
            list(result.outputs.forward_transforms))
        source_points = mapped[["x", "y", "z"]].to_numpy() * [-1, -1, 1]
    homogeneous = np.c_[mni_points, np.ones(4)]
    solution = np.linalg.solve(homogeneous, source_points)  # rows: points
    out = np.eye(4)
    out[:3, :] = solution.T
    return out


# --------------------------------------------------------------------------- preparation
def _crop(data: np.ndarray, mask: np.ndarray, affine: np.ndarray):
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    pad = np.ceil(_CROP_MARGIN_MM / zooms).astype(int)
    inside = np.argwhere(mask)
    lower = np.maximum(inside.min(0) - pad, 0)
    upper = np.minimum(inside.max(0) + pad + 1, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lower, upper))
    shifted = affine.copy()
    shifted[:3, 3] = apply_affine(affine, lower[:, None].astype(float))[:, 0]
    return data[box], mask[box], shifted


def _prepare(name: str, data: np.ndarray, mask: np.ndarray, affine: np.ndarray,
             mni_to_source: np.ndarray, voxel_mm: float) -> SourceAnatomy:
    data, mask, affine = _crop(data, mask, affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    data = np.where(mask, data, 0.0).astype(np.float32) / np.float32(np.median(data[mask]))
    sigma_mm = np.sqrt(np.clip(voxel_mm**2 - zooms**2, 0.0, None)) * _FWHM_TO_SIGMA
    if np.any(sigma_mm > 0.05 * zooms):
        data = ndi.gaussian_filter(data, sigma_mm / zooms, mode="constant")
    coefficients = ndi.spline_filter(data, order=3, output=np.float32, mode="mirror")
    return SourceAnatomy(name, coefficients, mask.astype(np.float32), affine, mni_to_source)


def template_source(template: TemplateFiles, voxel_mm: float) -> SourceAnatomy:
    """The template brain (the embedded MNI152NLin2009aSym, res-2) as a source."""
    data, affine = _load_volume(template.t1w)
    mask = np.asarray(nb.load(template.brain_mask).dataobj) > 0
    return _prepare(TEMPLATE_SOURCE, data, mask, affine, np.eye(4), voxel_mm)


def scan_source(path: Path, mni_to_source: np.ndarray, voxel_mm: float) -> SourceAnatomy:
    """A real skull-stripped scan as a source, with its registration affine."""
    data, affine = _load_volume(path)
    mask = _brain_mask(data, path)
    _check_volume(mask, affine, path)
    return _prepare(str(path), data, mask, affine, mni_to_source, voxel_mm)
