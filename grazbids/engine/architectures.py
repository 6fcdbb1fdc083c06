"""A second architecture: the 3D CNN of Kondrateva et al. (Kan et al., arXiv 2006.15969).

Blocks of [Conv3d 3x3x3 (padding 1) -> BatchNorm3d -> ReLU -> MaxPool3d 2], the block
width doubling from ``arch.channels`` (32/64/128 in the paper), then
Flatten -> Dropout(0.5) -> Linear(n_classes), or with ``arch.dense_units > 0``
Flatten -> Dropout -> Linear(dense_units) -> ReLU -> Dropout -> Linear(n_classes).

Built from standard modules in one ``nn.Sequential`` chain, so every method of
``grazbids.explain`` applies to it. It has no bias constraint and no ``lrp_layers()``:
the Graz+ relevance loss (training mode ``grazplus``) needs the GrazPlusNet and is
refused for it (``grazbids.engine.losses.check_mode_for_architecture``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import Architecture, GrazPlusNet

KONDRATEVA = "kondrateva"
DROPOUT = 0.5  # the paper's value; not an Architecture field to keep model cards unchanged


def kondrateva_architecture(input_shape: tuple[int, int, int], n_classes: int = 2, in_channels: int = 1) -> Architecture:
    """The paper's configuration: 3 blocks of 32/64/128 channels, dropout, one linear layer."""
    return Architecture(tuple(input_shape), n_classes=n_classes, in_channels=in_channels,
                        channels=32, n_blocks=3, dense_units=0, name=KONDRATEVA)


class KondratevaNet(nn.Module):
    """Conv-BN-ReLU-MaxPool blocks, then dense layers (``features`` then ``classifier``)."""

    def __init__(self, arch: Architecture):
        super().__init__()
        arch.check()
        if min(arch.input_shape) < 2 ** arch.n_blocks:
            raise ValueError(
                f"input_shape {tuple(arch.input_shape)} is too small for {arch.n_blocks} max-pooling "
                f"blocks (every side must be >= {2 ** arch.n_blocks})"
            )
        self.arch = arch
        blocks: list[nn.Module] = []
        in_ch, shape = arch.in_channels, list(arch.input_shape)
        for i in range(arch.n_blocks):
            out_ch = arch.channels * 2 ** i
            blocks += [nn.Conv3d(in_ch, out_ch, 3, padding=1), nn.BatchNorm3d(out_ch), nn.ReLU(), nn.MaxPool3d(2)]
            in_ch, shape = out_ch, [s // 2 for s in shape]
        self.features = nn.Sequential(*blocks)
        self.feature_shape = (in_ch, *shape)
        n_features = math.prod(self.feature_shape)
        if arch.dense_units > 0:
            head = [nn.Flatten(), nn.Dropout(DROPOUT), nn.Linear(n_features, arch.dense_units), nn.ReLU(),
                    nn.Dropout(DROPOUT), nn.Linear(arch.dense_units, arch.n_classes)]
        else:
            head = [nn.Flatten(), nn.Dropout(DROPOUT), nn.Linear(n_features, arch.n_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ARCHITECTURES = ("grazplus", KONDRATEVA)


def build_model(arch: Architecture) -> nn.Module:
    """The network named by ``arch.name``: ``grazplus`` (default; model cards without a
    name) or ``kondrateva``."""
    if arch.name == "grazplus":
        return GrazPlusNet(arch)
    if arch.name == KONDRATEVA:
        return KondratevaNet(arch)
    raise ValueError(f"unknown architecture {arch.name!r} (available: {', '.join(ARCHITECTURES)})")
