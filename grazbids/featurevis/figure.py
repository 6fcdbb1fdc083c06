"""PNG figure of a feature visualisation over the template: three orthogonal views
through the peak above a two-row axial mosaic (the layout of the group report)."""
from __future__ import annotations

import io
import warnings

import matplotlib

matplotlib.use("Agg")  # rendered in headless workers

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402
from nilearn import plotting  # noqa: E402
from scipy import ndimage  # noqa: E402

MOSAIC_SLICES = 12
# Values below this share of the colour maximum stay transparent so the anatomy shows.
THRESHOLD_SHARE = 0.1
PEAK_SMOOTHING_SIGMA = 2.0  # voxels; the ortho views cut through the smoothed peak


def _axial_cuts(mask: nb.Nifti1Image, n: int = MOSAIC_SLICES) -> list[float]:
    """`n` axial world coordinates evenly spread over the inner 80 % of the mask."""
    data = np.asanyarray(mask.dataobj) > 0.5
    slices = np.flatnonzero(data.any(axis=(0, 1)))
    low, high = (slices.min(), slices.max()) if len(slices) else (0, data.shape[2] - 1)
    span = high - low
    centre = np.array(data.shape) / 2
    return [float(nb.affines.apply_affine(mask.affine, [centre[0], centre[1], k])[2])
            for k in np.linspace(low + 0.1 * span, high - 0.1 * span, n)]


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
    cuts = _axial_cuts(mask)
    half = len(cuts) // 2

    fig = plt.figure(figsize=(11.0, 7.9), facecolor="black")
    layout = [("ortho", cut, (0.0, 0.5, 1.0, 0.5), title),
              ("z", cuts[:half], (0.0, 0.25, 1.0, 0.25), None),
              ("z", cuts[half:], (0.0, 0.0, 1.0, 0.25), None)]
    with warnings.catch_warnings():  # nilearn warns about non-finite or empty slices
        warnings.simplefilter("ignore")
        for mode, coords, axes, ttl in layout:
            plotting.plot_stat_map(
                vis, bg_img=background, display_mode=mode, cut_coords=coords, figure=fig, axes=axes,
                title=ttl, cmap="cold_hot" if signed else "hot", vmax=vmax,
                vmin=None if signed else 0.0, symmetric_cbar=signed,
                threshold=THRESHOLD_SHARE * vmax, colorbar=mode == "ortho", black_bg=True,
                draw_cross=False, dim=-0.3, annotate=mode == "ortho",
            )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)
    return buffer.getvalue()
