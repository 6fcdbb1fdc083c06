"""The Graz+ 3D CNN classifier (Tinauer et al. 2022).

Blocks of [3x3x3 conv, stride 1 -> ReLU; 3x3x3 conv, stride 2 -> ReLU], then
Flatten -> Dense -> ReLU -> Dense(n_classes). Every bias is kept <= 0 by a projection
after each optimiser step (`project_biases_`): with non-negative inputs and
non-positive biases, a unit can only fire when its positive-weight evidence is
positive, which is what makes the z+ rule a sound deep Taylor decomposition.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild the network (stored in the model card)."""

    input_shape: tuple[int, int, int]
    n_classes: int = 2
    in_channels: int = 1
    channels: int = 8
    n_blocks: int = 4
    dense_units: int = 16
    name: str = "grazplus"

    def check(self) -> None:
        """Raise ValueError for shapes no network can be built for."""
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be three positive sizes, got {self.input_shape}")
        if self.n_classes < 2:
            raise ValueError("n_classes must be >= 2")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["input_shape"] = tuple(int(v) for v in known["input_shape"])
        return cls(**known)


def _conv_out(size: int, stride: int) -> int:
    # kernel 3, padding 1
    return (size + 2 - 3) // stride + 1


class GrazPlusNet(nn.Module):
    """Graz+ classifier. `lrp_layers()` lists the weighted layers in order for LRP."""

    def __init__(self, arch: Architecture):
        super().__init__()
        arch.check()
        self.arch = arch
        convs = []
        in_ch, shape = arch.in_channels, list(arch.input_shape)
        for _ in range(arch.n_blocks):
            convs.append(nn.Conv3d(in_ch, arch.channels, 3, stride=1, padding=1))
            convs.append(nn.Conv3d(arch.channels, arch.channels, 3, stride=2, padding=1))
            in_ch = arch.channels
            shape = [_conv_out(s, 2) for s in shape]
        self.convs = nn.ModuleList(convs)
        self.feature_shape = (arch.channels, *shape)
        self.dense = nn.ModuleList(
            [nn.Linear(math.prod(self.feature_shape), arch.dense_units),
             nn.Linear(arch.dense_units, arch.n_classes)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He uniform weights and zero biases, as the original Keras model.
        for layer in self.lrp_layers():
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def lrp_layers(self) -> list[nn.Module]:
        return [*self.convs, *self.dense]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        x = torch.relu(self.dense[0](x.flatten(1)))
        return self.dense[1](x)

    @torch.no_grad()
    def project_biases_(self) -> None:
        """Projection onto the constraint set: bias <= 0 in every layer."""
        for layer in self.lrp_layers():
            layer.bias.clamp_(max=0.0)
