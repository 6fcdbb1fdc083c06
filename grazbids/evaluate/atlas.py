"""Atlas regions for explanation summaries: where, by anatomical label, a heat map puts relevance.

No atlas ships with grazbids (TemplateFlow's atlases are downloads, and nothing may touch
the network at run time), so the user gives one: a discrete segmentation (``dseg``) in
the template space of the run. Its region names come from a TSV next to it with the same
stem (TemplateFlow's ``*_dseg.tsv``: columns ``index`` and ``name``); without one the
regions are called ``region-<index>``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np


class AtlasError(ValueError):
    """The atlas file cannot be used (unreadable, not a label image, no regions)."""


@dataclass
class Atlas:
    labels: np.ndarray  # integer region index per voxel of the template grid (0: no region)
    names: dict[int, str]  # region index -> name, for every index present in ``labels``
    source: str

    def shares(self, heatmap: np.ndarray) -> dict[str, float]:
        """Fraction of the positive relevance in each region and outside every region.

        NaN everywhere for a map without positive relevance (a dead network's)."""
        positive = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
        if positive.shape != self.labels.shape:
            raise ValueError(f"heat map grid {positive.shape} differs from the atlas grid {self.labels.shape}")
        return self._fractions(positive.ravel())

    def volume_fractions(self) -> dict[str, float]:
        """Each region's share of the grid's voxels: the shares of a map spread evenly, to
        compare the relevance shares against."""
        return self._fractions(None)

    def column_names(self) -> list[str]:
        return [self.names[i] for i in sorted(self.names)] + ["outside_atlas"]

    def _fractions(self, weights: np.ndarray | None) -> dict[str, float]:
        """Share of ``weights`` (None: voxel counts) per region, label 0 as outside_atlas."""
        per_label = np.bincount(self.labels.ravel(), weights=weights, minlength=max(self.names) + 1)
        total = per_label.sum()
        values = per_label / total if total > 0 else np.full(per_label.shape, np.nan)
        return dict(zip(self.column_names(), [float(values[i]) for i in sorted(self.names)] + [float(values[0])]))


def _region_names(path: Path, indices: list[int]) -> dict[int, str]:
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    table = path.with_name(stem + ".tsv")
    names = {}
    if table.exists():
        with table.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if not rows or not {"index", "name"} <= set(rows[0]):
            raise AtlasError(f"{table}: needs the columns 'index' and 'name' (as TemplateFlow's *_dseg.tsv)")
        for row in rows:
            try:
                names[int(float(row["index"]))] = row["name"].strip()
            except ValueError:
                raise AtlasError(f"{table}: index {row['index']!r} is not an integer") from None
    # region names become column names: unique, and every present index needs one
    out = {i: names.get(i) or f"region-{i}" for i in indices}
    seen: dict[str, int] = {}
    for i, name in out.items():
        if name in seen:
            out[i] = f"{name}-{i}"
        seen[name] = i
    return out


def load_atlas(path: str | Path, reference: nb.Nifti1Image) -> Atlas:
    """The atlas ``path`` on the grid of ``reference`` (nearest-neighbour resampling when the
    grids differ: region labels must not be blended)."""
    path = Path(path)
    try:
        image = nb.load(str(path))
    except Exception as err:  # nibabel raises several types for unreadable files
        raise AtlasError(f"{path}: cannot read the atlas ({err})") from None
    if len(image.shape) != 3:
        raise AtlasError(f"{path}: an atlas must be a 3D label image, this one has shape {image.shape}")
    data = np.asanyarray(image.dataobj)
    if not np.allclose(data, np.round(data)) or data.min() < 0:
        raise AtlasError(f"{path}: not a label image (values must be non-negative integers; "
                         "a probabilistic atlas needs a discrete version, e.g. TemplateFlow's *_dseg)")
    if image.shape != reference.shape or not np.allclose(image.affine, reference.affine, atol=1e-3):
        from nilearn.image import resample_to_img
        image = resample_to_img(image, reference, interpolation="nearest", force_resample=True,
                                copy_header=True)
        data = np.asanyarray(image.dataobj)
    labels = np.round(data).astype(np.int64)
    indices = sorted(int(i) for i in np.unique(labels) if i > 0)
    if not indices:
        raise AtlasError(f"{path}: no labelled region on the template grid (is it in the template space?)")
    return Atlas(labels, _region_names(path, indices), str(path))
