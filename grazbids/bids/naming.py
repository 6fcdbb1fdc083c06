"""BIDS file names: parse a name, build a derivative's name, BIDS URIs.

The one place where grazbids spells BIDS naming rules; the derivatives sink
(``grazbids.interfaces.derivatives``) and the file finders (``grazbids.bids.patterns``)
build on it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

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
