"""PNG figure of a feature visualisation over the template: three orthogonal views
through the peak above a two-row axial mosaic (the layout of the reports, whose figure
helpers it uses)."""
from __future__ import annotations

import warnings

import nibabel as nb
import numpy as np
from nilearn import plotting
from scipy import ndimage

from ..reports.brain_figures import ortho_and_mosaic, axial_cuts

# Values below this share of the colour maximum stay transparent so the anatomy shows.
THRESHOLD_SHARE = 0.1
PEAK_SMOOTHING_SIGMA = 2.0  # voxels; the ortho views cut through the smoothed peak


def _smooth_peak(data: np.ndarray, signed: bool) -> tuple[int, int, int]:
    """Voxel of the largest smoothed value: clamped images have many tied maxima, and the
    first of them (np.argmax) is an arbitrary, often peripheral, voxel."""
    values = np.nan_to_num(np.abs(data) if signed else data)
    smoothed = ndimage.gaussian_filter(values, sigma=PEAK_SMOOTHING_SIGMA)
    return np.unravel_index(int(np.argmax(smoothed)), data.shape)


def featurevis_figure(vis: nb.Nifti1Image, background: nb.Nifti1Image, mask: nb.Nifti1Image,
                      *, title: str, signed: bool) -> bytes:
    """PNG bytes. ``signed``: a change from a start image (cold-hot, symmetric scale);
    otherwise the non-negative optimised image (hot)."""
    data = np.asanyarray(vis.dataobj, dtype=np.float64)
    inside = data[np.asanyarray(mask.dataobj) > 0.5] if mask.shape == data.shape else data.ravel()
    magnitude = np.abs(inside[np.isfinite(inside)])
    vmax = float(np.percentile(magnitude, 99.9)) if magnitude.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    cut = tuple(float(v) for v in nb.affines.apply_affine(vis.affine, _smooth_peak(data, signed)))

    def plot(mode, coords, fig, axes, ttl):
        with warnings.catch_warnings():  # nilearn warns about non-finite or empty slices
            warnings.simplefilter("ignore")
            return plotting.plot_stat_map(
                vis, bg_img=background, display_mode=mode, cut_coords=coords, figure=fig, axes=axes,
                title=ttl, cmap="cold_hot" if signed else "hot", vmax=vmax,
                vmin=None if signed else 0.0, symmetric_cbar=signed,
                threshold=THRESHOLD_SHARE * vmax, colorbar=mode == "ortho", black_bg=True,
                draw_cross=False, dim=-0.3, annotate=mode == "ortho",
            )

    return ortho_and_mosaic(plot, cut=cut, cuts=axial_cuts(mask), title=title)
