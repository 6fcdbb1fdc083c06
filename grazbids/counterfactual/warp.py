"""Spatial transformer, scaling and squaring, and the Jacobian of a displacement field.

Convention (as VoxelMorph): a displacement field ``u`` (B, 3, D, H, W) is in voxels along
the array axes (d, h, w), and warping *samples*: warped(p) = image(p + u(p)), trilinear.
The simulated image at p therefore shows the anatomy of the original at p + u(p), and
the local volume changes by 1 / det(I + grad u(p)) from the original to the simulated
image: ``log_volume_change = -log det(I + grad u)`` (< 0 shrinkage, > 0 expansion) is
the log-Jacobian map grazbids reports, in the simulated image's voxels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 3, D, H, W) voxel coordinates."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _sampling_grid(u: torch.Tensor) -> torch.Tensor:
    """Voxel displacement -> grid_sample's normalised (x=w, y=h, z=d) grid (align_corners)."""
    shape = u.shape[2:]
    position = identity_grid(shape, u.device, u.dtype) + u
    scale = torch.tensor([max(s - 1, 1) for s in shape], device=u.device, dtype=u.dtype).view(1, 3, 1, 1, 1)
    normalised = 2.0 * position / scale - 1.0
    return normalised.permute(0, 2, 3, 4, 1).flip(-1)


def warp(image: torch.Tensor, u: torch.Tensor, padding_mode: str = "zeros", mode: str = "bilinear") -> torch.Tensor:
    """image (B, C, D, H, W) sampled at p + u(p) (trilinear; 'bilinear' is grid_sample's 3D name)."""
    if image.shape[0] != u.shape[0] and image.shape[0] == 1:
        image = image.expand(u.shape[0], *image.shape[1:])
    return F.grid_sample(image, _sampling_grid(u), mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(u_first: torch.Tensor, u_second: torch.Tensor) -> torch.Tensor:
    """Displacement of 'warp by u_first, then by u_second': w(p) = u_second(p) + u_first(p + u_second(p))."""
    return u_second + warp(u_first, u_second, padding_mode="border")


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: exp(v) of a stationary velocity field, a diffeomorphism for
    smooth enough v (Arsigny et al. 2006; VoxelMorph's VecInt)."""
    u = v / (2 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def _gradient(u: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3, D, H, W): d u_i / d x_j, central differences inside, one-sided at the edges."""
    grads = torch.gradient(u, dim=(2, 3, 4))
    return torch.stack(grads, dim=2)


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """det(I + grad u), (B, D, H, W). <= 0 marks folded voxels."""
    j = _gradient(u)
    eye = torch.eye(3, device=u.device, dtype=u.dtype).view(1, 3, 3, 1, 1, 1)
    j = j + eye
    return (j[:, 0, 0] * (j[:, 1, 1] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 1])
            - j[:, 0, 1] * (j[:, 1, 0] * j[:, 2, 2] - j[:, 1, 2] * j[:, 2, 0])
            + j[:, 0, 2] * (j[:, 1, 0] * j[:, 2, 1] - j[:, 1, 1] * j[:, 2, 0]))


FOLD_FLOOR = 1e-3  # det clamped here before the log, so folded voxels give a finite (large) value


def log_volume_change(u: torch.Tensor) -> torch.Tensor:
    """log(volume in the simulated image / volume in the original) at each voxel of the
    simulated image: -log det(I + grad u). Folded voxels (det <= 0) get -log(FOLD_FLOOR)."""
    return -torch.log(jacobian_determinant(u).clamp_min(FOLD_FLOOR))


def folded_fraction(u: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of voxels (inside ``mask``) with det(I + grad u) <= 0."""
    folded = jacobian_determinant(u) <= 0
    if mask is not None:
        inside = mask.reshape(folded.shape) > 0.5
        return float(folded[inside].float().mean()) if inside.any() else 0.0
    return float(folded.float().mean())
