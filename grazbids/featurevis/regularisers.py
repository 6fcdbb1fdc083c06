"""Regularisers of activation maximisation (all on 5-D tensors (1, 1, D, H, W)).

Penalties (added to the loss, each with a weight): L2 and L1 decay, total variation.
They are sums over voxels, not means, so a weight is a trade-off per voxel that does not
depend on the grid size: with L2 weight w, a voxel stays bright only where the
objective gains more than 2 w x per unit of intensity.
Transformations: Gaussian blur applied to the image every k steps, random jitter
(a roll by up to n voxels before each forward pass). With a brain mask, the penalties
count only voxels inside it and the blur is a normalised convolution inside it, so the
empty background never leaks into the brain.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Regularisers:
    """Which regularisers to use, with their weights and parameters (0 = off)."""

    l2: float = 0.0  # weight of sum(x^2) inside the mask
    l1: float = 0.0  # weight of sum(|x|) inside the mask
    tv: float = 0.0  # weight of the anisotropic total variation (sum |finite difference|)
    blur_every: int = 0  # blur the image every k steps (0 = never)
    blur_sigma: float = 0.5  # Gaussian sigma in voxels
    jitter: int = 0  # roll the input by up to n voxels per axis before each step
    fourier: bool = False  # decorrelated Fourier parameterisation (parameterisation.py)
    fourier_decay: float = 1.0  # exponent of the 1/f frequency scaling

    def __post_init__(self):
        for name in ("l2", "l1", "tv", "blur_sigma", "fourier_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"regulariser {name} must be a finite number >= 0, got {value}")
        for name in ("blur_every", "jitter"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 0:
                raise ValueError(f"regulariser {name} must be an integer >= 0, got {getattr(self, name)}")
        if self.blur_every and self.blur_sigma <= 0:
            raise ValueError("blur_sigma must be > 0 when blur_every is set")

    def to_dict(self) -> dict:
        return asdict(self)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return values.sum() if mask is None else (values * mask).sum()


def l2_penalty(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return _masked_sum(x.pow(2), mask)


def l1_penalty(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return _masked_sum(x.abs(), mask)


def total_variation(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of absolute differences of neighbouring voxels along the three axes (pairs
    with both voxels inside ``mask`` only)."""
    total = x.new_zeros(())
    for dim in (2, 3, 4):
        n = x.shape[dim]
        diff = (x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)).abs()
        pair_mask = None if mask is None else mask.narrow(dim, 1, n - 1) * mask.narrow(dim, 0, n - 1)
        total = total + _masked_sum(diff, pair_mask)
    return total


def penalty(x: torch.Tensor, regs: Regularisers, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum of the active penalties (0 when none is active)."""
    total = x.new_zeros(())
    if regs.l2:
        total = total + regs.l2 * l2_penalty(x, mask)
    if regs.l1:
        total = total + regs.l1 * l1_penalty(x, mask)
    if regs.tv:
        total = total + regs.tv * total_variation(x, mask)
    return total


def _gaussian_kernel(sigma: float, like: torch.Tensor) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def _separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    radius = kernel.numel() // 2
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = kernel.numel()
        padding = [0, 0, 0]
        padding[dim] = radius
        x = F.conv3d(x, kernel.view(shape), padding=tuple(padding))
    return x


@torch.no_grad()
def gaussian_blur(x: torch.Tensor, sigma: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian blur (sigma in voxels) as a normalised convolution: blur(x m) / blur(m)
    with m the mask (all ones without one), so edges and the mask border do not darken.
    Voxels where blur(m) is 0 keep their value."""
    kernel = _gaussian_kernel(sigma, x)
    weight = torch.ones_like(x) if mask is None else mask.expand_as(x).to(x.dtype)
    numerator = _separable_blur(x * weight, kernel)
    denominator = _separable_blur(weight, kernel)
    return torch.where(denominator > 1e-6, numerator / denominator.clamp(min=1e-6), x)


def jitter_shift(max_shift: int, generator: torch.Generator) -> tuple[int, int, int]:
    """A random shift in [-max_shift, max_shift] per axis (from ``generator``, on the CPU,
    so the sequence of shifts does not depend on the device)."""
    return tuple(int(v) for v in torch.randint(-max_shift, max_shift + 1, (3,), generator=generator))


def jitter(x: torch.Tensor, shift: tuple[int, int, int]) -> torch.Tensor:
    return torch.roll(x, shifts=shift, dims=(2, 3, 4))
