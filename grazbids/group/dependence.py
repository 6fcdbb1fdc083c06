"""Out-of-fold decision dependence of the group level: for every held-out sample, how its
decision changes when the outside of the brain, the guidance region, the known shortcut or
the known effect is replaced (grazbids.explain.dependence)."""
from __future__ import annotations

import math

import nibabel as nb
import numpy as np
import torch

from ..engine import model_input
from ..explain.dependence import FILLS, decision_dependence

def _reference(path, shape) -> np.ndarray | None:
    data = np.asanyarray(nb.load(str(path)).dataobj) > 0.5
    if data.shape != tuple(shape):
        raise ValueError(f"{path}: grid {data.shape} differs from the images' {tuple(shape)}")
    return data if data.any() else None


def fold_dependence(model, images: torch.Tensor, masks: torch.Tensor, mode: str, mean_image: torch.Tensor,
                    references: list[dict]) -> list[dict[str, float]]:
    """One row per held-out sample (``images``/``masks``: its rows of the training data;
    ``references``: each sample's template-space effect/shortcut mask paths)."""
    shape = images.shape[2:]
    regions = {"outside": 1 - masks[:, :1]}
    if masks.shape[1] > 1:
        regions["guidance"] = masks[:, 1:2]
    for name in ("shortcut", "effect"):
        found = [_reference(r[name], shape) if name in r else None for r in references]
        if any(f is not None for f in found):
            regions[name] = found
    rows = [{} for _ in range(len(images))]
    for name, region in regions.items():
        if isinstance(region, list):  # per-sample reference masks; samples without one: NaN
            present = [i for i, r in enumerate(region) if r is not None]
            for i, r in enumerate(region):
                if r is None:
                    for fill in FILLS:
                        rows[i].update({f"prob_change_{name}_{fill}": math.nan, f"flip_{name}_{fill}": math.nan})
            if not present:
                continue
            index = torch.as_tensor(present)
            region_t = torch.from_numpy(np.stack([region[i] for i in present]).astype(np.float32))[:, None]
        else:
            index, region_t = torch.arange(len(images)), region
        x, m = images[index], masks[index]
        for fill_name, fill in (("zero", 0.0), ("mean", mean_image)):
            result = decision_dependence(model, x, region_t, fill, prepare=lambda imgs, m=m: model_input(imgs, m, mode))
            for i, row in zip(index.tolist(), result.rows(f"{name}_{fill_name}")):
                rows[i].update(row)
    return rows


def flip_rates(rows: list[dict]) -> dict[str, float | None]:
    """``<region>_<fill>`` -> share of the samples whose decision flips (None: not measured)."""
    names = sorted({k.removeprefix("flip_") for r in rows for k in r if k.startswith("flip_")})
    out = {}
    for name in names:
        values = np.array([r.get(f"flip_{name}", math.nan) for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[name] = float(values.mean()) if values.size else None
    return out
