"""Checks of each T1w image before any processing.

Every problem is reported as text naming the file and what is wrong, so one bad scan can
be excluded with a clear reason while the other participants are processed. The data
are read completely: a truncated ``.nii.gz`` has an intact header and only fails when the
last compressed block is reached.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# plausible voxel edge lengths of a structural MRI, in mm; outside this range the header
# is wrong (units in metres or micrometres, zeroed pixdim) or the image is not a brain MRI
MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 10.0
MIN_EXTENT = 8  # voxels per axis; fewer cannot hold a brain at any usable resolution
# Declared size, checked from the header before any voxel is read (a 1 MB gzip can declare
# 20000^3 voxels). 512^3 covers every structural protocol (0.5 mm whole head: 480x480x352);
# beyond it one registration worker needs many GB (768^3 at 0.3 mm: 4 GB measured).
MAX_VOXELS = 512**3
# peak memory of preprocessing one image per declared voxel (measured: 768^3 -> ~4 GB)
BYTES_PER_VOXEL = 10
# direction cosines must be orthogonal to this tolerance: ITK (ANTs) refuses a sheared
# sform above ~1e-4 ("ITK only supports orthonormal direction cosines") or silently reads
# the qform instead, i.e. another geometry than nibabel's
MAX_SHEAR = 1e-4


def voxel_limit(mem_gb: float | None = None) -> int:
    """Largest image (in voxels) accepted: MAX_VOXELS, lower when --mem-gb is smaller."""
    if mem_gb is None:
        return MAX_VOXELS
    return max(1, min(MAX_VOXELS, int(mem_gb * 1e9 / BYTES_PER_VOXEL)))


@dataclass
class ImageCheck:
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # accepted oddities, logged as warnings

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return f"{self.path}: " + "; ".join(self.problems or self.notes)


def _load(path: Path, max_voxels: int = MAX_VOXELS):
    """Header + fully read data, or a text saying why that is impossible. The declared
    size is checked against ``max_voxels`` before the data are read."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if path.is_symlink() and not path.exists():
        return None, None, ("is a broken symbolic link (a DataLad/git-annex file whose content "
                            "was not retrieved? try `datalad get`)")
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        return None, None, "does not exist"
    except PermissionError:
        return None, None, "cannot be read (permission denied)"
    except (ImageFileError, gzip.BadGzipFile) as err:
        return None, None, f"is not a readable NIfTI image ({err})"
    except (OSError, EOFError, ValueError, zlib.error) as err:
        return None, None, f"cannot be read: {err}"
    too_big = _declared_size_problem(img, max_voxels)
    if too_big:
        return img, None, too_big
    try:
        data = np.asanyarray(img.dataobj)  # reads every byte: this is what catches truncation
    except MemoryError:
        return img, None, f"does not fit into memory (shape {img.shape}, {img.get_data_dtype()})"
    except EOFError as err:
        return img, None, f"is truncated or corrupt (data end early: {err})"
    except (OSError, ValueError, zlib.error, gzip.BadGzipFile) as err:
        return img, None, f"is truncated or corrupt (data unreadable: {err})"
    return img, data, None


def _declared_size_problem(img, max_voxels: int) -> str | None:
    shape = tuple(int(n) for n in img.shape)
    voxels = int(np.prod(shape, dtype=object)) if shape else 0  # Python ints: no overflow
    if voxels <= max_voxels:
        return None
    gigabytes = voxels * max(img.get_data_dtype().itemsize, 4) / 1e9
    return (f"declares {'x'.join(map(str, shape))} voxels ({voxels:,}, {gigabytes:,.1f} GB as float32 or "
            f"more), above the limit of {max_voxels:,} voxels (512^3, or --mem-gb / {BYTES_PER_VOXEL} "
            "bytes per voxel); not loaded. A broken header, or an image finer than grazbids needs: "
            "resample it to 1 mm (e.g. `flirt -applyisoxfm 1` or `mri_convert -vs 1 1 1`) first")


def _shear(affine: np.ndarray) -> float:
    """Largest |cosine| between two voxel axes in world space (0 for an orthonormal affine)."""
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return float(np.abs(axes.T @ axes - np.eye(3)).max())


def _stored_zooms(path: Path, img) -> tuple:
    """Voxel sizes as written in the file: nibabel silently turns a zero pixdim into 1 on
    load, while ITK/ANTs would read the zero."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            raw = type(img.header).from_fileobj(handle, check=False)
        return raw.get_zooms()
    except Exception:  # non-NIfTI headers: nibabel's reading is all there is
        return img.header.get_zooms()


def check_t1w_image(path: str | Path, max_voxels: int = MAX_VOXELS) -> ImageCheck:
    path = Path(path)
    check = ImageCheck(path)
    img, data, problem = _load(path, max_voxels)
    if problem:
        check.problems.append(problem)
        return check

    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        # a singleton 4th axis is a common converter artefact; the image is still 3D
        check.notes.append(f"has a singleton 4th dimension {shape}; it is used as a 3D image")
        shape = shape[:3]
        data = data.reshape(shape)
    if len(shape) != 3:
        check.problems.append(f"is {len(img.shape)}D with shape {img.shape}; a 3D T1w image is needed")
        return check
    if min(shape) < MIN_EXTENT:
        check.problems.append(f"has shape {shape}; every axis needs at least {MIN_EXTENT} voxels")
    if data.dtype.kind not in "biuf":
        kind = "complex" if data.dtype.kind == "c" else f"{data.dtype} (e.g. RGB)"
        check.problems.append(f"holds {kind} voxel values; a real-valued magnitude T1w image is needed")
        return check

    zooms = tuple(float(z) for z in _stored_zooms(path, img)[:3])
    if not all(np.isfinite(zooms)) or not all(MIN_VOXEL_MM <= z <= MAX_VOXEL_MM for z in zooms):
        check.problems.append(
            f"has implausible voxel sizes {tuple(round(z, 4) for z in zooms)} mm "
            f"(expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm; is the header's pixdim/units wrong?)"
        )
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        check.problems.append("has a non-finite or singular voxel-to-world affine (broken qform/sform)")
    elif _shear(affine) > MAX_SHEAR:
        cosine = _shear(affine)
        check.problems.append(
            f"has a sheared (non-orthogonal) voxel-to-world affine (voxel axes {np.degrees(np.arcsin(min(cosine, 1))):.2g}"
            f" degrees off perpendicular, cosine {cosine:.2g} > {MAX_SHEAR:g}); ITK/ANTs cannot represent it. "
            "Reslice the image, or reset its sform to its qform (e.g. `fslorient -copyqform2sform`)")

    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum() - n_nan)
        check.problems.append(f"contains {n_nan} NaN and {n_inf} infinite voxel values")
    else:
        low, high = float(data.min()), float(data.max())
        if low == high == 0.0:
            check.problems.append("is empty (all voxels are zero)")
        elif low == high:
            check.problems.append(f"is constant (every voxel is {low:g})")
    return check
