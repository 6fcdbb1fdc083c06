"""Gradient-based maps of one class logit: gradient (saliency), gradient x input,
integrated gradients and guided backpropagation. They work for any differentiable model.

Only the input's gradient is taken (``torch.autograd.grad``), so the model's parameters
never receive ``.grad``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .blur import gaussian_blur3d
from .model_state import evaluation_mode
from .targets import Target, class_indices, selected


def _logit_gradient(model: nn.Module, x: torch.Tensor, target: Target, index: torch.Tensor | None = None):
    """d logit[class] / d x per sample (samples are independent in eval mode), and the class."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = model(leaf)
        if index is None:
            index = class_indices(logits.detach(), target)
        (grad,) = torch.autograd.grad(selected(logits, index).sum(), leaf)
    return grad, index


def gradient(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The raw (signed) gradient; its absolute value is the classic saliency map."""
    with evaluation_mode(model):
        return _logit_gradient(model, x, target)[0]


def gradient_x_input(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    with evaluation_mode(model):
        return x * _logit_gradient(model, x, target)[0]


def baseline_for(x: torch.Tensor, baseline: str, sigma: float) -> torch.Tensor:
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "blur":
        return gaussian_blur3d(x, sigma)
    raise ValueError(f"unknown baseline {baseline!r}: use 'zero' or 'blur'")


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target, baseline: str = "zero",
                         sigma: float = 4.0, steps: int = 50, chunk: int = 8) -> torch.Tensor:
    """(x - x0) * mean over the path x0 + t (x - x0) of the gradient, t at the midpoints
    (k + 1/2) / steps; the attributions then sum to f(x) - f(x0) up to the quadrature
    error (the completeness axiom). The class is chosen at ``x`` and fixed along the path."""
    if steps < 1 or chunk < 1:
        raise ValueError("steps and chunk must be >= 1")
    with evaluation_mode(model):
        with torch.no_grad():
            index = class_indices(model(x), target)
        reference = baseline_for(x, baseline, sigma)
        total = torch.zeros_like(x)
        alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
        for n in range(x.shape[0]):
            delta = x[n] - reference[n]
            for part in alphas.split(chunk):
                path = reference[n] + part.reshape(-1, 1, 1, 1, 1) * delta
                grad, _ = _logit_gradient(model, path, target, index[n].expand(len(part)))
                total[n] += grad.sum(dim=0)
        return (x - reference) * total / steps


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, and only where the input was > 0."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return a.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return grad_output.clamp(min=0) * (a > 0).to(grad_output.dtype)


_RELUS: set[Callable] = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_,
                         torch.Tensor.relu, torch.Tensor.relu_}


class _GuidedReLUMode(TorchFunctionMode):
    """Swaps every ReLU call (nn.ReLU modules and functional torch.relu alike) for the guided
    one while active; nothing in the model is modified. In-place ReLUs become out-of-place,
    which is fine wherever the result is used (as nn.ReLU(inplace=True) does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RELUS:
            return _GuidedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    with evaluation_mode(model), _GuidedReLUMode():
        return _logit_gradient(model, x, target)[0]
