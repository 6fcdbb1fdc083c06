"""Apply a trained simulator to one image: simulated images, fields, log-Jacobian maps and
the classifier's probabilities before and after the warp."""
from __future__ import annotations

from dataclasses import dataclass

import nibabel as nb
import numpy as np
import torch

from .losses import disease_log_odds
from .warp import folded_fraction, jacobian_determinant, log_volume_change, warp

DIRECTIONS = {"inject": 1.0, "remove": -1.0}
DISPLACEMENT_INTENT = 1006  # NIFTI_INTENT_DISPVECT


@dataclass
class Counterfactual:
    direction: str  # "inject" or "remove"
    field: np.ndarray  # (3, D, H, W) displacement in voxels: simulated(p) = original(p + u(p))
    simulated: np.ndarray  # (D, H, W) the image given as `display` (else the model input), warped
    log_jacobian: np.ndarray  # (D, H, W) log volume change original -> simulated
    probabilities_before: np.ndarray
    probabilities_after: np.ndarray
    log_odds_before: float
    log_odds_after: float
    folded_fraction: float  # in the brain mask
    min_jacobian: float


@torch.no_grad()
def counterfactuals(classifier, simulator, x: torch.Tensor, mask: torch.Tensor, positive: int,
                    display: torch.Tensor | None = None, directions=tuple(DIRECTIONS)) -> dict[str, Counterfactual]:
    """x (1, 1, D, H, W) as the classifier sees it; ``display`` an image on the same grid to warp
    for the output (e.g. the un-normalised T1w), default x."""
    logits = classifier(x)
    before = torch.softmax(logits, 1)[0].cpu().numpy()
    odds_before = float(disease_log_odds(logits, positive))
    results = {}
    for name in directions:
        c = torch.tensor([DIRECTIONS[name]], device=x.device)
        u = simulator(x, c, mask)
        logits_after = classifier(warp(x, u))
        shown = warp(display if display is not None else x, u)
        det = jacobian_determinant(u)
        inside = mask.reshape(det.shape) > 0.5
        results[name] = Counterfactual(
            name, u[0].cpu().numpy(), shown[0, 0].cpu().numpy(), log_volume_change(u)[0].cpu().numpy(),
            before, torch.softmax(logits_after, 1)[0].cpu().numpy(), odds_before,
            float(disease_log_odds(logits_after, positive)), folded_fraction(u, mask),
            float(det[inside].min()) if inside.any() else float("nan"))
    return results


def displacement_image(field: np.ndarray, affine: np.ndarray) -> nb.Nifti1Image:
    """The voxel displacement as a 4D (X, Y, Z, 3) image in mm along the world (RAS) axes."""
    world = np.einsum("ij,j...->...i", np.asarray(affine)[:3, :3], field).astype(np.float32)
    img = nb.Nifti1Image(world, affine)
    img.header.set_intent(DISPLACEMENT_INTENT)
    img.header.set_xyzt_units("mm")
    return img


def volume(data: np.ndarray, reference: nb.Nifti1Image) -> nb.Nifti1Image:
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), reference.affine, reference.header)
    img.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    return img
