"""Write BIDS-Derivatives files (with JSON sidecars) atomically.

`bids_derivative_name` builds the relative path of a derivative from its raw source file
and entities; `DerivativesSink` is the Nipype interface that copies a result there, with
a sidecar holding `Sources` (BIDS URIs), `SpatialReference`, `Resolution`,
`SkullStripped`/`Type` and any metadata passed in. Every file is first written under a
hidden temporary name in its final folder and then renamed with `os.replace`, so readers
never see a half-written output (and a crash leaves only a dot-file behind).
"""
from __future__ import annotations

import os
import re
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

from ..utils.atomic import atomic_path, write_json

# Entities copied from the raw T1w name, in BIDS order (anatomical entities only).
SOURCE_ENTITIES = ("sub", "ses", "acq", "ce", "rec", "run")
# Entities a derivative may add, in the order they appear in a name. `from`/`to`/`mode`
# (transforms) are not in the BIDS schema yet; sMRIPrep puts them right after the
# source entities, as here.
DERIVATIVE_ENTITIES = ("from", "to", "mode", "space", "res", "den", "label", "desc")
# MRI images: BIDS requires `SkullStripped` in their sidecars. Masks carry `Type`;
# segmentations, transforms, maps and tables carry neither.
MRI_SUFFIXES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "PD", "T1map", "T2map", "UNIT1",
                "inplaneT1", "inplaneT2", "angio")
IMAGE_EXTENSIONS = (".nii", ".nii.gz")
_LABEL = re.compile(r"^[a-zA-Z0-9]+$")
_MASK_TYPES = {"brain": "Brain", "roi": "ROI", "lesion": "Lesion"}


def split_extension(path: str | os.PathLike) -> tuple[str, str]:
    """('/a/sub-01_T1w', '.nii.gz') for '/a/sub-01_T1w.nii.gz'; handles double suffixes."""
    path = str(path)
    for double in (".nii.gz", ".tsv.gz", ".surf.gii", ".func.gii"):
        if path.endswith(double):
            return path[: -len(double)], double
    stem, ext = os.path.splitext(path)
    return stem, ext


def parse_bids_name(path: str | os.PathLike) -> tuple[dict[str, str], str, str]:
    """Entities, suffix and extension of a BIDS file name."""
    stem, ext = split_extension(Path(path).name)
    *pairs, suffix = stem.split("_")
    entities = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep:
            raise ValueError(f"{path}: '{pair}' is not a BIDS key-value entity")
        entities[key] = value
    if "sub" not in entities:
        raise ValueError(f"{path}: BIDS file name without a sub- entity")
    return entities, suffix, ext


def bids_derivative_name(source_file: str | os.PathLike, *, suffix: str,
                         extension: str, datatype: str | None = None,
                         **entities) -> str:
    """Relative path of a derivative of `source_file`.

    `entities` are derivative entities (`space`, `res`, `desc`, `label`, `from_` or
    `from`, `to`, `mode`, `den`); session/acquisition/run entities come from the source.
    Example: bids_derivative_name('.../sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz',
    space='MNI152NLin2009aSym', res=2, desc='preproc', suffix='T1w',
    extension='.nii.gz') -> 'sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz'
    """
    source_entities, _, _ = parse_bids_name(source_file)
    if "from_" in entities:
        entities["from"] = entities.pop("from_")
    unknown = set(entities) - set(DERIVATIVE_ENTITIES)
    if unknown:
        raise ValueError(f"unsupported derivative entities {sorted(unknown)}; "
                         f"use {list(DERIVATIVE_ENTITIES)}")
    parts = [f"{key}-{source_entities[key]}" for key in SOURCE_ENTITIES if key in source_entities]
    for key in DERIVATIVE_ENTITIES:
        value = entities.get(key)
        if value is None or value == "":
            continue
        value = str(value)
        if not _LABEL.match(value):
            raise ValueError(f"invalid BIDS label {key}-{value!r} (letters and digits only)")
        parts.append(f"{key}-{value}")
    if not _LABEL.match(suffix):
        raise ValueError(f"invalid BIDS suffix {suffix!r}")
    if not extension.startswith("."):
        extension = "." + extension
    datatype = datatype or Path(source_file).parent.name
    if datatype not in ("anat", "func", "dwi", "fmap", "perf", "pet"):
        datatype = "anat"
    folder = [f"sub-{source_entities['sub']}"]
    if "ses" in source_entities:
        folder.append(f"ses-{source_entities['ses']}")
    return "/".join(folder + [datatype, "_".join(parts + [suffix]) + extension])


def bids_uri(path: str | os.PathLike, dataset_root: str | os.PathLike,
             dataset_name: str = "raw") -> str:
    """BIDS URI (`bids:raw:sub-01/anat/sub-01_T1w.nii.gz`) of a file inside a dataset.

    Paths are compared without resolving symbolic links (DataLad datasets link into
    .git/annex)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(dataset_root))
    if rel.startswith(os.pardir):
        raise ValueError(f"{path} is not inside the dataset {dataset_root}")
    return f"bids:{dataset_name}:{Path(rel).as_posix()}"


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
