"""Separable Gaussian blur of (N, C, D, H, W) volumes, differentiable."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_blur3d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur every channel with an isotropic Gaussian (sigma in voxels, edges replicated)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = x
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out
