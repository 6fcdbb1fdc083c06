"""Activation maximisation: gradient ascent on the input image (Eitel et al., arXiv
2203.13120; Olah et al., Distill 2017).

Each step: decode the parameters to an image ``x``, multiply by the brain mask (the
optimisation happens only inside it), roll by a random jitter, run the model, and take an
Adam step on ``-objective + penalties(x)``. Between steps the image is blurred (every k
steps) and clamped to the model's input range (a projection, exact for both
parameterisations). From a given start image, the penalties and the blur act on the
change ``x - start`` instead. The result is ``clamp(x) * mask``.

On the CPU a run is bit-identical for the same seed, inputs and thread count (noise and
jitter come from a CPU generator, so they do not depend on the device either). On CUDA
convolution backward passes are not bit-reproducible unless
``torch.use_deterministic_algorithms(True)`` is set by the caller.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn

from .objectives import Objective, checked, objective_function
from .parameterisation import make_parameterisation
from .regularisers import Regularisers, gaussian_blur, jitter, jitter_shift, penalty

STARTS = ("noise", "zeros", "image")


@dataclass(frozen=True)
class AscentSettings:
    iterations: int = 200
    lr: float = 0.05
    seed: int = 0
    start: str = "noise"  # noise | zeros | image (the image is given to `maximise`)
    noise_mean: float = 0.5  # noise start: mean + sd * standardised noise (normalised units)
    noise_sd: float = 0.1
    regularisers: Regularisers = field(default_factory=Regularisers)

    def __post_init__(self):
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {self.iterations}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AscentResult:
    image: torch.Tensor  # (D, H, W) on the CPU: clamp(x) * mask
    start_image: torch.Tensor  # (D, H, W) on the CPU: the image the ascent started from
    objective: Objective  # with defaults filled in (a neuron's centre voxel)
    objective_value: float  # objective on the final image (no jitter)
    start_value: float  # objective on the start image
    start_gradient: float  # mean |d objective / d voxel| (inside the mask) at the start image
    history: list[float]  # objective per step (on the jittered image the step saw)
    seconds_per_iteration: float
    parameterisation: dict  # which one, with its parameters
    penalised: str  # what the penalties and the blur act on: "image" or "change from the start image"


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Evaluation mode and no weight gradients for the duration; restored afterwards."""
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)


def _value_and_gradient(value_of, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
    """The objective and its mean absolute gradient per voxel at ``x``: the scale that
    penalty weights compete with (an L2 weight w pulls a voxel back by 2 w x)."""
    x = x.detach().clone().requires_grad_(True)
    value = value_of(x)
    (grad,) = torch.autograd.grad(value, x)
    grad = grad.abs() if mask is None else grad.abs()[mask > 0]
    return float(value.detach()), float(grad.mean())


def _as_volume(tensor, shape, name: str, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if tuple(tensor.shape[-3:]) != tuple(shape) or tensor.numel() != math.prod(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the model input {tuple(shape)}")
    return tensor.reshape(1, 1, *shape).to(device=like.device, dtype=like.dtype)


def _input_shape(model: nn.Module, input_shape) -> tuple[int, int, int]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("input_shape is needed for a model without an `arch` attribute")
    return tuple(arch.input_shape)


def maximise(
    model: nn.Module,
    objective: Objective,
    settings: AscentSettings = AscentSettings(),
    *,
    start_image=None,
    mask=None,
    value_range: tuple[float, float] | None = (0.0, 2.0),
    input_shape: tuple[int, int, int] | None = None,
) -> AscentResult:
    """Optimise an input image of the model's input shape to maximise ``objective``.

    ``start_image`` (used with ``settings.start == "image"``) and ``mask`` are arrays or
    tensors of the input shape; ``value_range`` clamps the image (None: no clamping).
    Runs on the device of the model's parameters, in their dtype.
    """
    shape = _input_shape(model, input_shape)
    like = next(model.parameters())
    regs = settings.regularisers
    if settings.start == "image" and start_image is None:
        raise ValueError("start='image' needs a start_image")
    if value_range is not None and not value_range[0] < value_range[1]:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range}")
    mask_t = None if mask is None else (_as_volume(mask, shape, "mask", like) > 0.5).to(like.dtype)
    if mask_t is not None and not mask_t.any():
        raise ValueError("the mask is empty: nothing to optimise")

    generator = torch.Generator().manual_seed(int(settings.seed))
    param_form = make_parameterisation(shape, regs.fourier, regs.fourier_decay)
    if settings.start == "image":
        x0 = _as_volume(start_image, shape, "start_image", like)
    elif settings.start == "zeros":
        x0 = torch.zeros((1, 1, *shape), device=like.device, dtype=like.dtype)
    else:
        noise = param_form.noise(generator)
        x0 = (settings.noise_mean + settings.noise_sd * noise).to(device=like.device, dtype=like.dtype)

    def project(x: torch.Tensor) -> torch.Tensor:
        return x if value_range is None else x.clamp(*value_range)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return x if mask_t is None else x * mask_t

    x0 = project(x0)
    # From a given image the penalties and the blur act on the change from it, so they keep
    # the image near the start instead of pulling it to zero and flattening its anatomy.
    reference = x0 if settings.start == "image" else torch.zeros_like(x0)
    with _frozen(model):
        objective = checked(model, objective, masked(x0))
        params = param_form.encode(x0).requires_grad_(True)
        optimiser = torch.optim.Adam([params], lr=settings.lr)
        history: list[float] = []
        with objective_function(model, objective) as value_of:
            start_value, start_gradient = _value_and_gradient(value_of, masked(x0), mask_t)
            started = time.perf_counter()
            for step in range(1, settings.iterations + 1):
                optimiser.zero_grad(set_to_none=True)
                x = param_form.decode(params)
                seen = masked(x)
                if regs.jitter:
                    seen = jitter(seen, jitter_shift(regs.jitter, generator))
                value = value_of(seen)
                loss = -value + penalty(x - reference, regs, mask_t)
                loss.backward()
                optimiser.step()
                blur_now = regs.blur_every and step % regs.blur_every == 0
                if blur_now or value_range is not None:
                    with torch.no_grad():
                        x = param_form.decode(params)
                        if blur_now:
                            x = reference + gaussian_blur(x - reference, regs.blur_sigma, mask_t)
                        params.copy_(param_form.encode(project(x)))
                history.append(float(value.detach()))
            seconds = (time.perf_counter() - started) / settings.iterations
            with torch.no_grad():
                final = masked(project(param_form.decode(params)))
                final_value = float(value_of(final))
    if not math.isfinite(final_value) or not torch.isfinite(final).all():
        raise FloatingPointError("activation maximisation diverged (non-finite image or objective); "
                                 "lower lr or add clamping / L2 decay")
    return AscentResult(
        image=final[0, 0].detach().cpu(),
        start_image=masked(x0)[0, 0].detach().cpu(),
        objective=objective,
        objective_value=final_value,
        start_value=start_value,
        start_gradient=start_gradient,
        history=history,
        seconds_per_iteration=seconds,
        parameterisation=param_form.describe(),
        penalised="change from the start image" if settings.start == "image" else "image",
    )
