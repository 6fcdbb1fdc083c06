"""What activation maximisation maximises: a class logit, the mean activation of one
channel of a named Conv3d layer, or one unit (channel + voxel) of such a layer.

Layers are found by their module name (``dict(model.named_modules())``, e.g. ``convs.6``
in the GrazPlusNet, ``features.4`` in the Kondrateva network). The value is the Conv3d's
output: in the GrazPlusNet the ReLU is applied functionally after it, so this is the
pre-activation, which keeps a gradient even while the unit is off (Olah et al. 2017
visualise pre-ReLU units for the same reason).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch
from torch import nn

FEATURE_LAYER_TYPES = (nn.Conv3d,)


class ObjectiveError(ValueError):
    """An objective that does not fit the model (unknown layer, index out of range)."""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", text) or "x"


@dataclass(frozen=True)
class ClassLogit:
    """The logit (pre-softmax output) of one class."""

    index: int
    name: str | None = None

    @property
    def slug(self) -> str:
        return f"class-{_slug(self.name if self.name is not None else str(self.index))}"

    def describe(self) -> dict:
        return {"Type": "class_logit", "ClassIndex": self.index, "ClassName": self.name}


@dataclass(frozen=True)
class Channel:
    """The mean over space of one output channel of a Conv3d layer."""

    layer: str
    channel: int

    @property
    def slug(self) -> str:
        return f"layer-{_slug(self.layer)}_channel-{self.channel}"

    def describe(self) -> dict:
        return {"Type": "channel_mean", "Layer": self.layer, "Channel": self.channel,
                "Value": "mean over space of the Conv3d output (pre-ReLU)"}


@dataclass(frozen=True)
class Neuron:
    """One unit: a channel of a Conv3d layer at one voxel of its output grid
    (``None``: the centre of that grid)."""

    layer: str
    channel: int
    voxel: tuple[int, int, int] | None = None

    @property
    def slug(self) -> str:
        where = "centre" if self.voxel is None else "x".join(str(v) for v in self.voxel)
        return f"layer-{_slug(self.layer)}_channel-{self.channel}_voxel-{where}"

    def describe(self) -> dict:
        return {"Type": "neuron", "Layer": self.layer, "Channel": self.channel,
                "Voxel": None if self.voxel is None else list(self.voxel),
                "Value": "Conv3d output (pre-ReLU) at one voxel of the layer's output grid"}


Objective = Union[ClassLogit, Channel, Neuron]


def feature_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The named layers whose channels can be visualised."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FEATURE_LAYER_TYPES)}


def feature_layer(model: nn.Module, name: str) -> nn.Module:
    valid = feature_layers(model)
    if name in valid:
        return valid[name]
    listing = ", ".join(valid) or "(none)"
    modules = dict(model.named_modules())
    if name in modules:
        raise ObjectiveError(f"layer {name!r} is a {type(modules[name]).__name__}, not a Conv3d; "
                             f"Conv3d layers: {listing}")
    raise ObjectiveError(f"unknown layer {name!r}; Conv3d layers: {listing}")


def class_objective(spec: str | int, classes: list[str] | None = None) -> ClassLogit:
    """A class given by its name in ``classes`` or by its index."""
    classes = [str(c) for c in classes] if classes is not None else None
    if classes is not None and str(spec) in classes:
        return ClassLogit(classes.index(str(spec)), str(spec))
    try:
        index = int(spec)
    except (TypeError, ValueError):
        known = ", ".join(classes) if classes else "(no class names known; give an index)"
        raise ObjectiveError(f"unknown class {spec!r}; classes: {known}") from None
    if classes is not None and not 0 <= index < len(classes):
        raise ObjectiveError(f"class index {index} out of range: the model has {len(classes)} "
                             f"classes ({', '.join(classes)})")
    return ClassLogit(index, classes[index] if classes is not None else None)


def _check_feature_index(objective: Channel | Neuron, output: torch.Tensor) -> Neuron | Channel:
    if output.ndim != 5:
        raise ObjectiveError(f"layer {objective.layer!r} gives a {output.ndim}-D output, expected 5-D")
    n_channels, grid = output.shape[1], tuple(output.shape[2:])
    if not 0 <= objective.channel < n_channels:
        raise ObjectiveError(f"channel {objective.channel} out of range for layer {objective.layer!r} "
                             f"({n_channels} channels: 0-{n_channels - 1})")
    if isinstance(objective, Neuron):
        if objective.voxel is None:
            return Neuron(objective.layer, objective.channel, tuple(s // 2 for s in grid))
        if len(objective.voxel) != 3 or not all(0 <= v < s for v, s in zip(objective.voxel, grid)):
            raise ObjectiveError(f"voxel {tuple(objective.voxel)} is outside the output grid "
                                 f"{'x'.join(map(str, grid))} of layer {objective.layer!r}")
    return objective


@torch.no_grad()
def checked(model: nn.Module, objective: Objective, probe: torch.Tensor) -> Objective:
    """Validate ``objective`` against the model with one forward pass on ``probe``
    (an input of the right shape); returns it with a default voxel filled in."""
    if isinstance(objective, ClassLogit):
        n_outputs = model(probe).shape[1]
        if not 0 <= objective.index < n_outputs:
            raise ObjectiveError(f"class index {objective.index} out of range: the model has "
                                 f"{n_outputs} outputs")
        return objective
    with _captured_output(feature_layer(model, objective.layer)) as captured:
        model(probe)
    return _check_feature_index(objective, captured["out"])


@contextmanager
def _captured_output(module: nn.Module) -> Iterator[dict]:
    captured: dict = {}
    handle = module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def objective_function(model: nn.Module, objective: Objective) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yield ``f(x) -> scalar`` (for a batch of one) that runs the model and reads the
    objective; forward hooks are removed on exit."""
    if isinstance(objective, ClassLogit):
        yield lambda x: model(x)[0, objective.index]
        return
    with _captured_output(feature_layer(model, objective.layer)) as captured:
        def value(x: torch.Tensor) -> torch.Tensor:
            model(x)
            out = captured.pop("out")[0, objective.channel]
            if isinstance(objective, Neuron):
                return out[tuple(objective.voxel)]
            return out.mean()

        yield value
