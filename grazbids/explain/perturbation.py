"""Meaningful perturbations in 3D (Fong & Vedaldi 2017; as in Kan, ..., Kondrateva et al. 2020).

Find the smallest, smoothest region whose deletion destroys the class score: a mask m in
[0, 1] on a coarse grid (every ``mask_downsample``-th voxel) is upsampled trilinearly to
the input grid and blurred (``mask_sigma``); the perturbed image is
``x * M + blur(x) * (1 - M)`` (``blur_sigma``), and Adam minimises

    l1 * mean|1 - m| + tv * sum_axes mean|m_{i+1} - m_i|^tv_beta + mean_copies p_class(jitter(perturbed))

with m clamped to [0, 1] after every step, starting from m = 1 (nothing deleted).
``copies`` jittered copies (circular shifts of up to ``jitter`` voxels, drawn from a
generator seeded with ``seed``) are averaged in every iteration, against artefacts that
exploit the exact voxel grid. The saliency is 1 - M. The class score is the softmax
probability (as in Fong & Vedaldi). The L1 and TV terms are means over the coarse mask,
so their weights do not depend on the grid size. Deterministic on CPU for a given seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blur import gaussian_blur3d
from .model_state import evaluation_mode
from .targets import Target, class_indices, selected


def total_variation(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Per sample: sum over the three axes of mean |finite difference|^beta."""
    tv = torch.zeros(m.shape[0], dtype=m.dtype, device=m.device)
    for axis in (2, 3, 4):
        if m.shape[axis] > 1:
            tv = tv + (m.diff(dim=axis).abs() ** beta).mean(dim=(1, 2, 3, 4))
    return tv


def _full_mask(m: torch.Tensor, size: torch.Size, sigma: float) -> torch.Tensor:
    return gaussian_blur3d(F.interpolate(m, size=size, mode="trilinear", align_corners=False), sigma)


def meaningful_perturbation(model: nn.Module, x: torch.Tensor, target: Target, iterations: int = 300,
                            lr: float = 0.3, l1: float = 3.0, tv: float = 1.0, tv_beta: float = 3.0,
                            mask_downsample: int = 4, mask_sigma: float = 1.0, blur_sigma: float = 5.0,
                            jitter: int = 2, copies: int = 2, seed: int = 0) -> torch.Tensor:
    """Saliency 1 - M shaped like ``x`` (one mask per sample, shared by all channels)."""
    if iterations < 0 or copies < 1 or mask_downsample < 1 or jitter < 0:
        raise ValueError("iterations >= 0, copies >= 1, mask_downsample >= 1 and jitter >= 0 are required")
    size = x.shape[2:]
    coarse = [max(1, math.ceil(s / mask_downsample)) for s in size]
    generator = torch.Generator().manual_seed(seed)
    x = x.detach()
    with evaluation_mode(model), torch.enable_grad():
        with torch.no_grad():
            index = class_indices(model(x), target)
            blurred = gaussian_blur3d(x, blur_sigma)
        m = torch.ones(x.shape[0], 1, *coarse, dtype=x.dtype, device=x.device, requires_grad=True)
        optimiser = torch.optim.Adam([m], lr=lr)
        for _ in range(iterations):
            mask = _full_mask(m, size, mask_sigma)
            perturbed = x * mask + blurred * (1 - mask)
            shifts = torch.randint(-jitter, jitter + 1, (copies, 3), generator=generator).tolist()
            batch = torch.cat([torch.roll(perturbed, shift, dims=(2, 3, 4)) for shift in shifts])
            probs = torch.softmax(model(batch), dim=1)
            score = selected(probs, index.repeat(copies)).reshape(copies, -1).mean(dim=0)
            loss = (l1 * (1 - m).abs().mean(dim=(1, 2, 3, 4)) + tv * total_variation(m, tv_beta) + score).sum()
            (m.grad,) = torch.autograd.grad(loss, m)
            optimiser.step()
            with torch.no_grad():
                m.clamp_(0, 1)
        with torch.no_grad():
            saliency = (1 - _full_mask(m, size, mask_sigma)).clamp(0, 1)  # blur rounding: |1 - 1| ~ 1e-16
    return saliency.expand_as(x).clone()
