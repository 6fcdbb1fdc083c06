"""Write BIDS-Derivatives files (with JSON sidecars) atomically.

`DerivativesSink` is the Nipype interface that copies a result to the path that
`grazbids.bids.naming.bids_derivative_name` gives, with
a sidecar holding `Sources` (BIDS URIs), `SpatialReference`, `Resolution`,
`SkullStripped`/`Type` and any metadata passed in. Every file is first written under a
hidden temporary name in its final folder and then renamed with `os.replace`, so readers
never see a half-written output (and a crash leaves only a dot-file behind).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..bids.naming import IMAGE_EXTENSIONS, MRI_SUFFIXES, bids_derivative_name, bids_uri, parse_bids_name, split_extension
from ..utils.atomic import atomic_path, write_json

_MASK_TYPES = {"brain": "Brain", "roi": "ROI", "lesion": "Lesion"}  # sidecar Type of desc-<x>_mask

# --------------------------------------------------------------------------- atomic IO
def atomic_copy(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy `src` to `target` via a hidden temp file + os.replace.

    A .nii source stored as .nii.gz (or the reverse) is re-encoded by nibabel."""
    target = Path(target)
    src_ext, target_ext = split_extension(src)[1], split_extension(target)[1]
    # the temp name keeps the target's extension: nibabel picks compression from it
    with atomic_path(target, suffix=target_ext) as tmp:
        if src_ext != target_ext and target_ext in (".nii", ".nii.gz"):
            import nibabel as nb

            nb.save(nb.load(src), tmp)
        else:
            shutil.copyfile(src, tmp)
    return target


def atomic_write_json(data: dict, target: str | os.PathLike) -> Path:
    return write_json(target, data)


def _grid_description(image: str, space: str, res: str) -> str:
    """`Resolution` text from the image header, e.g. '2 mm isotropic ... grid'."""
    import nibabel as nb

    img = nb.load(image)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    shape = "x".join(str(s) for s in img.shape[:3])
    if max(zooms) - min(zooms) < 1e-3:
        size = f"{zooms[0]:g} mm isotropic"
    else:
        size = "x".join(f"{z:g}" for z in zooms) + " mm"
    return f"{size} {space} grid ({shape} voxels; TemplateFlow res-{res})"


# --------------------------------------------------------------------------- interface
class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="result to store")
    source_file = traits.Str(mandatory=True, desc="raw BIDS file it derives from")
    bids_dir = traits.Str(mandatory=True, desc="root of the raw BIDS dataset")
    output_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix (T1w, mask, probseg, xfm)")
    extension = traits.Str(desc="extension with leading dot; default: that of in_file")
    space = traits.Str(desc="space- entity (template identifier)")
    res = traits.Either(traits.Int, traits.Str, desc="res- entity")
    desc = traits.Str(desc="desc- entity")
    label = traits.Str(desc="label- entity")
    from_ = traits.Str(desc="from- entity (transforms)")
    to = traits.Str(desc="to- entity (transforms)")
    mode = traits.Str(desc="mode- entity (transforms)")
    spatial_reference = traits.Str(desc="SpatialReference; default: the space label, "
                                        "or the raw source URI for native-space images")
    resolution = traits.Str(desc="Resolution text; default: derived from the header")
    skull_stripped = traits.Bool(desc="SkullStripped (required for MRI images, e.g. T1w)")
    mask_type = traits.Str(desc="Type of a mask; default from desc (brain -> Brain)")
    extra_sources = traits.List(traits.Str, desc="further BIDS URIs for Sources")
    metadata = traits.Dict(desc="additional sidecar fields (fixed at build time)")
    extra_metadata = traits.Dict(desc="additional sidecar fields (connected at run time)")
    raw_dataset_name = traits.Str("raw", usedefault=True,
                                  desc="DatasetLinks key of the raw dataset in URIs")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_file = File(desc="path of the written derivative")
    out_meta = File(desc="path of its JSON sidecar")


class DerivativesSink(SimpleInterface):
    """Store one derivative file and its sidecar under BIDS-Derivatives names."""

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec
    # Always rewrite: a cached work dir must still restore deleted/changed outputs.
    _always_run = True

    def _entities(self) -> dict:
        inputs = self.inputs
        out = {}
        for key in ("space", "res", "desc", "label", "from_", "to", "mode"):
            value = getattr(inputs, key)
            if isdefined(value):
                out[key] = value
        return out

    def _sidecar(self, out_file: Path, extension: str) -> dict:
        inputs = self.inputs
        suffix = inputs.suffix
        source_uri = bids_uri(inputs.source_file, inputs.bids_dir, inputs.raw_dataset_name)
        meta: dict = {"Sources": [source_uri] + list(inputs.extra_sources or [])}
        is_image = extension in IMAGE_EXTENSIONS
        if is_image:
            if isdefined(inputs.spatial_reference):
                meta["SpatialReference"] = inputs.spatial_reference
            elif isdefined(inputs.space):
                meta["SpatialReference"] = inputs.space
            else:
                meta["SpatialReference"] = source_uri
        if isdefined(inputs.res):
            if isdefined(inputs.resolution):
                meta["Resolution"] = inputs.resolution
            elif is_image:
                space = inputs.space if isdefined(inputs.space) else "native"
                meta["Resolution"] = _grid_description(inputs.in_file, space, str(inputs.res))
            else:
                raise ValueError(f"{out_file.name}: res- needs a `resolution` description")
        if suffix == "mask":
            if isdefined(inputs.mask_type):
                meta["Type"] = inputs.mask_type
            elif isdefined(inputs.desc) and inputs.desc in _MASK_TYPES:
                meta["Type"] = _MASK_TYPES[inputs.desc]
            else:
                raise ValueError(f"{out_file.name}: a mask needs `mask_type` (BIDS `Type`)")
        extras = {}
        for extra in (inputs.metadata, inputs.extra_metadata):
            if isdefined(extra) and extra:
                extras.update(extra)
        if is_image and suffix in MRI_SUFFIXES and suffix != "mask":
            if isdefined(inputs.skull_stripped):
                meta["SkullStripped"] = bool(inputs.skull_stripped)
            elif "SkullStripped" not in extras:
                raise ValueError(
                    f"{out_file.name}: BIDS requires SkullStripped for a {suffix} image; "
                    "connect `skull_stripped`"
                )
        meta.update(extras)
        return meta

    def _run_interface(self, runtime):
        inputs = self.inputs
        extension = (inputs.extension if isdefined(inputs.extension)
                     else split_extension(inputs.in_file)[1])
        relpath = bids_derivative_name(inputs.source_file, suffix=inputs.suffix,
                                       extension=extension, **self._entities())
        out_file = Path(inputs.output_dir) / relpath
        meta = self._sidecar(out_file, extension)  # validate before writing anything
        atomic_copy(inputs.in_file, out_file)
        sidecar = Path(split_extension(out_file)[0] + ".json")
        atomic_write_json(meta, sidecar)
        self._results["out_file"] = str(out_file)
        self._results["out_meta"] = str(sidecar)
        return runtime


__all__ = [
    "DerivativesSink",
    "atomic_copy",
    "atomic_write_json",
    "bids_derivative_name",
    "bids_uri",
    "parse_bids_name",
    "split_extension",
]
