"""The layer graph LRP walks: a model as a plain chain of steps in forward order.

Supported models (anything else raises ``UnsupportedModelError`` naming the module):

* ``GrazPlusNet``: its ``lrp_layers()`` with ReLU between them and a flatten before the
  first dense layer (its forward uses functional ``torch.relu``).
* Any other ``nn.Module`` whose forward is a plain chain of these modules, each one fed
  the previous one's output (e.g. nested ``nn.Sequential``; ``x.flatten(1)`` /
  ``x.view(n, -1)`` before a ``Linear`` is recognised): ``Conv3d`` (zero padding),
  ``Linear``, ``BatchNorm3d``/``BatchNorm1d`` directly after a ``Conv3d``/``Linear``
  (folded into it with its running statistics), ``ReLU``, ``MaxPool3d``, ``AvgPool3d``,
  ``AdaptiveAvgPool3d``, ``Flatten``, ``Dropout`` (identity in eval mode), ``Identity``.

The chain is found by running the model once on the first sample with forward hooks on
its leaf modules (removed afterwards) and checking, by tensor identity, that every module
consumed the previous module's output and that the model returned the last one's. A
functional op between modules (``torch.relu``, ``x + skip``, a branch) breaks that check.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.model import GrazPlusNet

SUPPORTED_MODULES = (
    "Conv3d (zero padding), Linear, BatchNorm3d/BatchNorm1d directly after Conv3d/Linear, ReLU, "
    "MaxPool3d, AvgPool3d, AdaptiveAvgPool3d, Flatten, Dropout (eval), Identity"
)


class UnsupportedModelError(TypeError):
    """The model is not a plain chain of supported modules; the message names the module."""


@dataclass
class Affine:
    """A Conv3d or Linear layer, with a following batch norm folded into weight and bias."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    conv: dict | None = None  # stride, padding, dilation, groups; None for Linear

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.apply(a, self.weight, self.bias)

    def apply(self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's operation with (modified) weights, without a bias unless given."""
        if self.conv is None:
            return F.linear(a, weight, bias)
        return F.conv3d(a, weight, bias, **self.conv)

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
        """``weight^T s`` shaped like the layer input (the input-gradient of ``<forward(a), s>``)."""
        if self.conv is None:
            return s @ weight
        return torch.nn.grad.conv3d_input(in_shape, weight, s, **self.conv)


@dataclass
class Pool:
    """MaxPool3d ("max": winner takes all) or AvgPool3d/AdaptiveAvgPool3d ("avg": proportional)."""

    name: str
    kind: str
    fn: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fn(a)


@dataclass
class Flatten:
    name: str
    start_dim: int = 1

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.flatten(self.start_dim)


@dataclass
class PassThrough:
    """ReLU, Dropout (eval) or Identity: relevance passes through unchanged."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda a: a)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fn(a)


Step = Affine | Pool | Flatten | PassThrough


def _conv_settings(name: str, conv: nn.Conv3d) -> dict:
    if conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"module '{name}' (Conv3d) uses padding_mode={conv.padding_mode!r}; only 'zeros' is supported")
    padding = conv.padding
    if isinstance(padding, str):  # 'valid' or 'same'
        if padding == "valid":
            padding = (0, 0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in total):
                raise UnsupportedModelError(f"module '{name}' (Conv3d): padding='same' with an even kernel is not supported")
            padding = tuple(t // 2 for t in total)
    return {"stride": conv.stride, "padding": padding, "dilation": conv.dilation, "groups": conv.groups}


def _affine(name: str, layer: nn.Module, norm: nn.Module | None) -> Affine:
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if norm is not None:
        if not norm.track_running_stats or norm.running_mean is None:
            raise UnsupportedModelError(f"module '{name}': batch norm without running statistics cannot be folded")
        scale = torch.rsqrt(norm.running_var.detach().to(weight.dtype) + norm.eps)
        if norm.affine:
            scale = scale * norm.weight.detach()
        shift = -norm.running_mean.detach().to(weight.dtype) * scale
        if norm.affine:
            shift = shift + norm.bias.detach()
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
        bias = bias * scale + shift
    conv = _conv_settings(name, layer) if isinstance(layer, nn.Conv3d) else None
    return Affine(name, weight, bias, conv)


def _grazplus_chain(model: GrazPlusNet) -> list[Step]:
    layers = model.lrp_layers()
    names = {id(m): n for n, m in model.named_modules()}
    steps: list[Step] = []
    flattened = False
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear) and not flattened:
            steps.append(Flatten("flatten"))
            flattened = True
        steps.append(_affine(names[id(layer)], layer, None))
        if i < len(layers) - 1:
            steps.append(PassThrough(f"relu{i}", torch.relu))
    return steps


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], torch.Tensor]:
    calls: list[_Call] = []
    handles = []

    def record(name):
        def hook(module, inputs, output):
            if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise UnsupportedModelError(f"module '{name}' ({type(module).__name__}) does not map one tensor to one tensor")
            calls.append(_Call(name, module, inputs[0], output))

        return hook

    try:
        for name, module in model.named_modules():
            if not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(record(name or type(module).__name__)))
        with torch.no_grad():
            output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def _is_flattened(tensor: torch.Tensor, previous: torch.Tensor) -> bool:
    return (tensor.dim() == 2 and previous.dim() > 2 and tensor.shape[0] == previous.shape[0]
            and tensor.numel() == previous.numel() and tensor.data_ptr() == previous.data_ptr())


def _chain_from_calls(model: nn.Module, x: torch.Tensor, calls: list[_Call], output: torch.Tensor) -> list[Step]:
    where = type(model).__name__
    steps: list[Step] = []
    previous, previous_name = x, "the input"
    i = 0
    while i < len(calls):
        call = calls[i]
        kind = type(call.module).__name__
        if call.input is not previous:
            if not _is_flattened(call.input, previous):
                raise UnsupportedModelError(
                    f"{where}: module '{call.name}' ({kind}) is not fed the output of {previous_name}: the forward "
                    f"applies an operation that is not a module (e.g. torch.relu, a skip connection or a branch). "
                    f"LRP supports plain chains of: {SUPPORTED_MODULES}"
                )
            steps.append(Flatten(f"{call.name}.flatten"))
        module = call.module
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            norm = None
            follows = calls[i + 1] if i + 1 < len(calls) else None
            if follows is not None and isinstance(follows.module, (nn.BatchNorm3d, nn.BatchNorm1d)) and follows.input is call.output:
                norm, i = follows.module, i + 1
            steps.append(_affine(call.name, module, norm))
            call = calls[i]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(
                f"{where}: module '{call.name}' ({kind}) does not directly follow a Conv3d or Linear layer, "
                "so it cannot be folded into one"
            )
        elif isinstance(module, nn.ReLU):
            steps.append(PassThrough(call.name, torch.relu))
        elif isinstance(module, (nn.Dropout, nn.Dropout3d, nn.Identity)):
            steps.append(PassThrough(call.name))
        elif isinstance(module, nn.MaxPool3d):
            if module.return_indices:
                raise UnsupportedModelError(f"{where}: module '{call.name}' (MaxPool3d) returns indices")
            steps.append(Pool(call.name, "max", module))
        elif isinstance(module, (nn.AvgPool3d, nn.AdaptiveAvgPool3d)):
            steps.append(Pool(call.name, "avg", module))
        elif isinstance(module, nn.Flatten):
            if module.end_dim != -1:
                raise UnsupportedModelError(f"{where}: module '{call.name}' (Flatten) must flatten to the last axis")
            steps.append(Flatten(call.name, module.start_dim))
        else:
            raise UnsupportedModelError(f"{where}: module '{call.name}' ({kind}) is not supported by LRP; supported: {SUPPORTED_MODULES}")
        previous, previous_name = call.output, f"module '{call.name}'"
        i += 1
    if output is not previous:
        raise UnsupportedModelError(
            f"{where}: the model's output is not the output of {previous_name}: the forward ends with an "
            f"operation that is not a module. LRP supports plain chains of: {SUPPORTED_MODULES}"
        )
    return steps


def layer_chain(model: nn.Module, x: torch.Tensor) -> list[Step]:
    """The model as a list of steps in forward order (call with the model in eval mode)."""
    if isinstance(model, GrazPlusNet):
        return _grazplus_chain(model)
    sample = x[:1]
    calls, output = _trace(model, sample)
    return _chain_from_calls(model, sample, calls, output)
