"""Grad-CAM in 3D (Selvaraju et al.; as used by Kan, ..., Kondrateva et al. 2020).

For the chosen layer's output A (channels k): alpha_k = spatial mean of d logit / d A^k;
map = ReLU(sum_k alpha_k A^k), upsampled trilinearly to the input grid and (by default)
divided by its maximum per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model_state import evaluation_mode
from .targets import Target, class_indices, selected


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv3d)]


def _find_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if layer is None:
        convs = conv_layer_names(model)
        if not convs:
            raise ValueError(f"{type(model).__name__} has no Conv3d layer for Grad-CAM")
        layer = convs[-1]
    if layer not in modules or layer == "":
        raise ValueError(f"no layer named {layer!r} in {type(model).__name__}; Conv3d layers: {', '.join(conv_layer_names(model))}")
    return layer, modules[layer]


def grad_cam(model: nn.Module, x: torch.Tensor, target: Target, layer: str | None = None, normalise: bool = True) -> torch.Tensor:
    """Grad-CAM map shaped like ``x`` (the same map in every input channel)."""
    name, module = _find_layer(model, layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with evaluation_mode(model), torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # a graph even for frozen weights
            if len(captured) != 1 or captured[0].dim() != 5:
                raise ValueError(f"Grad-CAM layer {name!r} must be called once and give a 5-D (N, C, D, H, W) output")
            activation = captured[0]
            index = class_indices(logits.detach(), target)
            (grad,) = torch.autograd.grad(selected(logits, index).sum(), activation)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)
    if normalise:
        peak = cam.amax(dim=(1, 2, 3, 4), keepdim=True)
        cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, torch.ones_like(peak)), cam)
    return cam.expand_as(x).clone()
