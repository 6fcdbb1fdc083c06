"""Brain figures (nilearn on the Agg backend), returned as PNG bytes.

Each figure shows three orthogonal views above an axial mosaic, so a reader sees both
one point in detail and the whole brain at a glance. Heat maps share one colour scale
when they are compared (classes of the group report).
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are rendered in headless workers

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402
from nilearn import plotting  # noqa: E402

LOG = logging.getLogger("grazbids.reports")
HEAT_CMAP = "hot"
# Signed maps (log-Jacobian): blue < 0 (shrinkage), red > 0 (expansion), white 0; the
# colour scale is symmetric, so equal colours mean equal magnitudes of either sign.
SIGNED_CMAP = "RdBu_r"
MOSAIC_SLICES = 12  # two rows of six axial slices
# Relevance below this share of the colour maximum is left transparent, so the anatomy
# under weak relevance stays visible.
HEAT_THRESHOLD_SHARE = 0.1
TEMPLATE_MASK_COLOUR = "#ff3030"
SUBJECT_MASK_COLOUR = "#30ff30"
WM_COLOUR = "#30c0ff"


def png_bytes(fig) -> bytes:
    """Render and close `fig` (closing matters: workers render many figures)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)
    return buffer.getvalue()


def _load(img) -> nb.Nifti1Image:
    img = nb.load(str(img)) if not isinstance(img, nb.spatialimages.SpatialImage) else img
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        img = nb.Nifti1Image(data[..., 0], img.affine)
    return img


def _world(img: nb.Nifti1Image, ijk) -> np.ndarray:
    return nb.affines.apply_affine(img.affine, np.asarray(ijk, dtype=float))


def mask_centre(mask_img) -> tuple[float, float, float]:
    """World coordinates of the mask's centre of mass (cut point of the ortho views)."""
    img = _load(mask_img)
    voxels = np.argwhere(np.asanyarray(img.dataobj) > 0.5)
    if not len(voxels):
        voxels = np.argwhere(np.ones(img.shape[:3], bool))
    return tuple(float(v) for v in _world(img, voxels.mean(0)))


def axial_cuts(mask_img, n: int = MOSAIC_SLICES) -> list[float]:
    """`n` evenly spaced axial (z) world coordinates through the inner 80 % of the mask."""
    img = _load(mask_img)
    data = np.asanyarray(img.dataobj) > 0.5
    voxels = np.argwhere(data)
    if not len(voxels):
        voxels = np.argwhere(np.ones(data.shape, bool))
    # world z of the mask's voxels: right for any voxel orientation (raw scans are often
    # sagittal or coronal), and the same as a voxel-axis range on axis-aligned grids
    z = _world(img, voxels)[:, 2]
    low, high = float(np.min(z)), float(np.max(z))
    span = high - low
    return [float(v) for v in np.linspace(low + 0.1 * span, high - 0.1 * span, n)]


def top_share_threshold(images, mask_img, share: float = 0.1) -> float:
    """Value above which the top ``share`` of the brain voxels of all maps together lie.

    Mean maps over many participants are smooth and mostly above a fixed share of their
    maximum; showing the top voxels shows where the relevance concentrates."""
    mask = np.asanyarray(_load(mask_img).dataobj) > 0.5
    values = np.concatenate([np.asanyarray(_load(img).dataobj, dtype=np.float64)[mask] for img in images])
    values = values[np.isfinite(values)]
    return float(np.percentile(values, 100 * (1 - share))) if values.size else 0.0


def robust_max(images, mask_img=None, percentile: float = 99.9) -> float:
    """Colour maximum shared by several heat maps: the highest of their percentiles."""
    mask = None if mask_img is None else np.asanyarray(_load(mask_img).dataobj) > 0.5
    values = []
    for img in images:
        data = np.asanyarray(_load(img).dataobj, dtype=np.float64)
        data = data[mask] if mask is not None and mask.shape == data.shape else data.ravel()
        positive = data[np.isfinite(data) & (data > 0)]
        if positive.size:
            values.append(float(np.percentile(positive, percentile)))
    return max(values) if values else 1.0


def robust_abs_max(images, mask_img=None, percentile: float = 99.0) -> float:
    """Symmetric colour limit shared by signed maps: the highest percentile of |value| in
    the mask (0 when every map is 0 there)."""
    mask = None if mask_img is None else np.asanyarray(_load(mask_img).dataobj) > 0.5
    values = []
    for img in images:
        data = np.abs(np.asanyarray(_load(img).dataobj, dtype=np.float64))
        data = data[mask] if mask is not None and mask.shape == data.shape else data.ravel()
        data = data[np.isfinite(data) & (data > 0)]
        if data.size:
            values.append(float(np.percentile(data, percentile)))
    return max(values) if values else 0.0


def _contours(display, outlines) -> None:
    for img, colour in outlines:
        with warnings.catch_warnings():  # nilearn warns when a slice misses the contour
            warnings.simplefilter("ignore")
            display.add_contours(_load(img), levels=[0.5], colors=[colour], linewidths=1.2)


def ortho_and_mosaic(plot, *, cut, cuts, title: str, outlines=(), width: float = 11.0):
    """`plot(display_mode, cut_coords, figure, axes, title)`: an ortho row, then the
    axial slices `cuts` in two mosaic rows (one row would make them too small)."""
    fig = plt.figure(figsize=(width, width * 0.72), facecolor="black")
    half = (len(cuts) + 1) // 2
    displays = [plot("ortho", cut, fig, (0.0, 0.5, 1.0, 0.5), title),
                plot("z", cuts[:half], fig, (0.0, 0.25, 1.0, 0.25), None),
                plot("z", cuts[half:], fig, (0.0, 0.0, 1.0, 0.25), None)]
    for display in displays:
        _contours(display, outlines)
    return png_bytes(fig)


def anatomy_figure(anat_img, *, mask_img, title: str, outlines=()) -> bytes:
    """Anatomy with coloured outlines, e.g. template brain mask and tissue boundaries."""
    anat = _load(anat_img)

    def plot(mode, coords, fig, axes, ttl):
        return plotting.plot_anat(anat, display_mode=mode, cut_coords=coords, figure=fig, axes=axes,
                                  title=ttl, black_bg=True, draw_cross=False, dim=-0.3,
                                  annotate=mode == "ortho", colorbar=False)

    return ortho_and_mosaic(plot, cut=mask_centre(mask_img), cuts=axial_cuts(mask_img),
                             title=title, outlines=outlines)


def heatmap_figure(heat_img, anat_img, *, mask_img, title: str, vmax: float | None = None,
                   outlines=()) -> bytes:
    """Relevance over anatomy; ortho views cut through the relevance peak."""
    heat = _load(heat_img)
    data = np.asanyarray(heat.dataobj, dtype=np.float64)
    vmax = vmax or robust_max([heat], mask_img)
    peak = np.unravel_index(int(np.nanargmax(data)), data.shape)

    def plot(mode, coords, fig, axes, ttl):
        return plotting.plot_stat_map(
            heat, bg_img=_load(anat_img), display_mode=mode, cut_coords=coords, figure=fig,
            axes=axes, title=ttl, cmap=HEAT_CMAP, vmin=0, vmax=vmax,
            threshold=HEAT_THRESHOLD_SHARE * vmax, symmetric_cbar=False,
            colorbar=mode == "ortho",
            black_bg=True, draw_cross=False, dim=-0.3, annotate=mode == "ortho",
            cbar_tick_format="%.1e",
        )

    cut = tuple(float(v) for v in _world(heat, peak))
    return ortho_and_mosaic(plot, cut=cut, cuts=axial_cuts(mask_img), title=title, outlines=outlines)


def class_heatmaps_figure(maps: dict[str, object], anat_img, *, mask_img, vmax: float,
                          threshold: float | None = None, n_slices: int = MOSAIC_SLICES) -> bytes:
    """One row of axial slices per class, the same slices and colour scale in every row
    (the layout of the Graz+ paper's mean relevance figures); values below ``threshold``
    (default: a share of vmax) are transparent."""
    threshold = HEAT_THRESHOLD_SHARE * vmax if threshold is None else threshold
    cuts = axial_cuts(mask_img, n_slices)
    anat = _load(anat_img) if anat_img is not None else None
    rows = len(maps)
    fig = plt.figure(figsize=(12, 1.9 * rows + 0.3), facecolor="black")
    height = 1.0 / rows
    for row, (name, img) in enumerate(maps.items()):
        plotting.plot_stat_map(
            _load(img), bg_img=anat, display_mode="z", cut_coords=cuts, figure=fig,
            axes=(0.0, 1.0 - (row + 1) * height, 1.0, height), title=name, cmap=HEAT_CMAP,
            vmin=0, vmax=vmax, threshold=threshold, symmetric_cbar=False,
            colorbar=row == 0, black_bg=True, draw_cross=False, dim=0.3, annotate=False,
            cbar_tick_format="%.1e",
        )
    return png_bytes(fig)


def _rows_figure(rows: int):
    fig = plt.figure(figsize=(12, 1.9 * rows + 0.3), facecolor="black")
    return fig, 1.0 / rows


def anatomy_rows_figure(images: dict[str, object], *, mask_img, n_slices: int = MOSAIC_SLICES) -> bytes:
    """One row of axial slices per image (e.g. original and simulated), the same slices and
    the same grey scale in every row (that of the first image), so rows compare directly."""
    cuts = axial_cuts(mask_img, n_slices)
    first = np.asanyarray(_load(next(iter(images.values()))).dataobj, dtype=np.float64)
    mask = np.asanyarray(_load(mask_img).dataobj) > 0.5
    values = first[mask] if mask.shape == first.shape else first.ravel()
    values = values[np.isfinite(values)]
    vmin, vmax = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    fig, height = _rows_figure(len(images))
    for row, (name, img) in enumerate(images.items()):
        plotting.plot_anat(_load(img), display_mode="z", cut_coords=cuts, figure=fig,
                           axes=(0.0, 1.0 - (row + 1) * height, 1.0, height), title=name, black_bg=True,
                           draw_cross=False, annotate=False, colorbar=False, dim=0,
                           vmin=float(vmin), vmax=float(max(vmax, vmin + 1e-6)))
    return png_bytes(fig)


def signed_rows_figure(maps: dict[str, object], anat_imgs, *, mask_img, vmax: float,
                       threshold: float | None = None, n_slices: int = MOSAIC_SLICES) -> bytes:
    """One row of axial slices per signed map over its anatomy (``anat_imgs``: one image for
    every row, or a dict with the rows' names), diverging colours centred on 0 with the
    symmetric limits +-vmax in every row; |values| below ``threshold`` (default: a share of
    vmax) are transparent."""
    vmax = max(float(vmax), 1e-12)  # an all-zero map still draws (as anatomy only)
    threshold = HEAT_THRESHOLD_SHARE * vmax if threshold is None else threshold
    cuts = axial_cuts(mask_img, n_slices)
    fig, height = _rows_figure(len(maps))
    for row, (name, img) in enumerate(maps.items()):
        anat = anat_imgs.get(name) if isinstance(anat_imgs, dict) else anat_imgs
        with warnings.catch_warnings():  # a map with nothing above the threshold is drawn as anatomy
            warnings.filterwarnings("ignore", message="empty mask")
            plotting.plot_stat_map(
                _load(img), bg_img=_load(anat) if anat is not None else None, display_mode="z", cut_coords=cuts,
                figure=fig, axes=(0.0, 1.0 - (row + 1) * height, 1.0, height), title=name, cmap=SIGNED_CMAP,
                vmax=vmax, threshold=threshold, symmetric_cbar=True, colorbar=row == 0, black_bg=True,
                draw_cross=False, dim=0.3, annotate=False, cbar_tick_format="%.2g",
            )
    return png_bytes(fig)


def template_underlay(template: str, resolution, maps) -> tuple[object | None, object]:
    """(background, mask) for group maps on a template grid: the template's brain (as the
    skull-stripped images the network saw) when its grid matches the maps', else no
    background and the maps' own support (non-zero anywhere) as mask."""
    from ..templates import TemplateNotFoundError, get_template

    maps = [str(m) for m in maps]
    shape = _load(maps[0]).shape[:3]
    try:
        tpl = get_template(template, int(resolution))
        if tuple(tpl.shape) == tuple(shape):
            t1w, mask = nb.load(str(tpl.t1w)), nb.load(str(tpl.brain_mask))
            brain = np.asanyarray(t1w.dataobj) * (np.asanyarray(mask.dataobj) > 0)
            return nb.Nifti1Image(brain.astype(np.float32), t1w.affine), str(tpl.brain_mask)
        LOG.warning("report: %s grid %s differs from the template's %s; no anatomical underlay",
                    Path(maps[0]).name, shape, tpl.shape)
    except (TemplateNotFoundError, ValueError) as err:
        LOG.warning("report: no template underlay for %s (%s)", Path(maps[0]).name, err)
    first = _load(maps[0])
    support = np.any([np.asanyarray(_load(m).dataobj) != 0 for m in maps], axis=0)
    return None, nb.Nifti1Image(support.astype(np.uint8), first.affine)
