"""Brain masks and tissue maps of one T1w, and the checks built on them.

* `NativeBrainMask`: the subject's own brain mask from a brain-extracted T1w: voxels
  with signal (T1w > 0; the background of these images is exactly 0), holes filled,
  largest connected component. Used as the registration mask term and for the QC Dice.
* `BrainMaskOverlap`: the Dice coefficient between the template brain mask and the
  subject's brain mask brought onto the template grid (linear interpolation, > 0.5).
  This is the registration quality number reported in docs/preprocessing.md.
* `SkullStrippedCheck`: decides BIDS `SkullStripped` for the T1w: true when at most
  `max_outside_fraction` (5 %) of the total T1w signal lies outside the template brain
  mask mapped to native space and dilated by `margin_mm` (5 mm, for registration slack).
  Brain-extracted ds002748 images leave 0.06-1 % there after an affine registration
  (sub-48, the worst-registered, 0.98 %); skull, scalp and neck put tens of percent
  of a T1w's signal there.

Template-space brain/tissue maps are the template's own files at the chosen resolution
(`grazbids.templates.get_template`); native-space ones are those maps warped back with
the reverse transforms by `registration.ApplyTransforms` (nearest neighbour for the
mask, linear for probabilities), wired in `grazbids.workflows.participant`.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from scipy import ndimage as ndi


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def brain_mask_from_t1w(data: np.ndarray) -> np.ndarray:
    """Signal > 0, largest connected component, holes filled (brain-extracted T1w)."""
    mask = np.asarray(data) > 0
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndi.binary_fill_holes(mask)


def _dilate_mm(mask: np.ndarray, support: np.ndarray, zooms, margin_mm: float) -> np.ndarray:
    """`mask` dilated by a ball of `margin_mm`, exact (Euclidean distance in mm).

    The distance map is computed only in the bounding box of `mask | support` (plus the
    margin): everything outside it is neither mask nor signal."""
    both = mask | support
    pad = np.ceil(margin_mm / np.asarray(zooms)).astype(int) + 1
    lo = np.maximum(np.argwhere(both).min(0) - pad, 0)
    hi = np.minimum(np.argwhere(both).max(0) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    dilated = np.zeros_like(mask)
    dilated[box] = ndi.distance_transform_edt(~mask[box], sampling=zooms) <= margin_mm
    return dilated


def _save_like(data: np.ndarray, reference: nb.spatialimages.SpatialImage, path: Path,
               dtype=np.uint8) -> Path:
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, reference.header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    nb.save(img, path)
    return path


class _NativeBrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="brain-extracted T1w")


class _NativeBrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="uint8 brain mask on the T1w grid")
    volume_ml = traits.Float(desc="mask volume in ml")


class NativeBrainMask(SimpleInterface):
    """Brain mask of a brain-extracted T1w on its own grid."""

    input_spec = _NativeBrainMaskInputSpec
    output_spec = _NativeBrainMaskOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        mask = brain_mask_from_t1w(np.asanyarray(img.dataobj))
        if not mask.any():
            raise ValueError(f"{self.inputs.in_file}: the image has no voxel > 0")
        out = _save_like(mask, img, Path(runtime.cwd) / "native_brain_mask.nii.gz")
        self._results["out_mask"] = str(out)
        self._results["volume_ml"] = float(mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000)
        return runtime


class _OverlapInputSpec(BaseInterfaceInputSpec):
    moving_mask = File(exists=True, mandatory=True, desc="subject brain mask, native grid")
    template_mask = File(exists=True, mandatory=True, desc="template brain mask")
    transforms = InputMultiObject(File(exists=True), mandatory=True,
                                  desc="native->template transforms (ANTs order)")
    mask_description = traits.Str("subject T1w>0 mask", usedefault=True,
                                  desc="what moving_mask is (for the QC definition)")


class _OverlapOutputSpec(TraitedSpec):
    dice = traits.Float(desc="Dice(template mask, registered subject mask)")
    warped_mask = File(exists=True, desc="subject mask on the template grid")
    metadata = traits.Dict(desc="QC entry for a sidecar")


class BrainMaskOverlap(SimpleInterface):
    """Registration QC: Dice between template and registered subject brain masks."""

    input_spec = _OverlapInputSpec
    output_spec = _OverlapOutputSpec

    def _run_interface(self, runtime):
        import ants

        warped = ants.apply_transforms(
            fixed=ants.image_read(self.inputs.template_mask),
            moving=ants.image_read(self.inputs.moving_mask).clone("float"),
            transformlist=list(self.inputs.transforms), interpolator="linear",
        )
        subject = warped.numpy() > 0.5
        template_img = nb.load(self.inputs.template_mask)
        template = np.asanyarray(template_img.dataobj) > 0
        value = dice(subject, template)
        out = _save_like(subject, template_img, Path(runtime.cwd) / "registered_brain_mask.nii.gz")
        self._results.update(
            dice=value,
            warped_mask=str(out),
            metadata={"RegistrationQC": {
                "BrainMaskDice": round(value, 4),
                "Definition": f"Dice(template brain mask, {self.inputs.mask_description} "
                              "registered with linear interpolation and thresholded at 0.5)",
            }},
        )
        return runtime


class _SkullStrippedInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w, native grid")
    brain_mask = File(exists=True, mandatory=True,
                      desc="template brain mask mapped onto the T1w grid")
    margin_mm = traits.Float(5.0, usedefault=True, desc="dilation of the mask")
    max_outside_fraction = traits.Float(0.05, usedefault=True,
                                        desc="largest signal fraction outside the mask "
                                             "for a skull-stripped image")


class _SkullStrippedOutputSpec(TraitedSpec):
    skull_stripped = traits.Bool()
    outside_fraction = traits.Float(desc="fraction of the T1w signal outside the mask")


class SkullStrippedCheck(SimpleInterface):
    """BIDS `SkullStripped`: (almost) no T1w signal outside the dilated brain mask."""

    input_spec = _SkullStrippedInputSpec
    output_spec = _SkullStrippedOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        mask_img = nb.load(self.inputs.brain_mask)
        if mask_img.shape[:3] != img.shape[:3] or not np.allclose(mask_img.affine, img.affine,
                                                                  atol=1e-3):
            raise ValueError(f"{self.inputs.brain_mask} is not on the grid of "
                             f"{self.inputs.in_file}")
        signal = np.clip(np.asanyarray(img.dataobj).astype(np.float32), 0, None)
        mask = np.asanyarray(mask_img.dataobj) > 0
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
        total = float(signal.sum())
        if total <= 0 or not mask.any():
            outside = 1.0
        else:
            outside = float(signal[~_dilate_mm(mask, signal > 0, zooms,
                                                self.inputs.margin_mm)].sum()) / total
        self._results["outside_fraction"] = outside
        self._results["skull_stripped"] = bool(outside <= self.inputs.max_outside_fraction)
        return runtime
