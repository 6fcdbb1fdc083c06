"""The simulator: a conditional 3D U-Net that outputs a displacement (or velocity) field.

Every convolution is a ConditionalConv3d, so the direction c (+1 inject, -1 remove)
selects the kernels. To keep 2 mm volumes affordable on a CPU the U-Net can work on the
input average-pooled by ``field_downsample``; its field is upsampled trilinearly to the
image grid (the field is smooth anyway) and the image is always warped and classified at
full resolution. With ``diffeomorphic`` the output is a stationary velocity integrated by
scaling and squaring (warp.integrate_velocity), so det(I + grad u) stays positive.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .conditional import ConditionalConv3d
from .warp import integrate_velocity


@dataclass(frozen=True)
class SimulatorArchitecture:
    input_shape: tuple[int, int, int]
    channels: tuple[int, ...] = (8, 16, 32)  # per U-Net level; len = levels
    n_experts: int = 3
    field_downsample: int = 2  # U-Net resolution = image resolution / this
    diffeomorphic: bool = False
    integration_steps: int = 7
    name: str = "conditional-unet"
    # > 0: the field fades to zero within this many voxels (of the U-Net's grid) inside the
    # brain's outline, so the warp cannot move the brain against its background (measured:
    # without it the simulator flipped decisions by moving the outline; docs/counterfactual.md)
    hold_outline_voxels: int = 0
    # True: the field's mean inside the brain is subtracted, so the warp cannot shift the whole
    # brain: the one deformation that neither smoothness penalty charges (grad u = 0), which the
    # simulator used to flip decisions (docs/counterfactual.md, "Session 9")
    centre_field: bool = False

    def check(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be three positive sizes, got {self.input_shape}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be positive, got {self.channels}")
        if self.field_downsample < 1 or self.n_experts < 1 or self.integration_steps < 0 or self.hold_outline_voxels < 0:
            raise ValueError("field_downsample and n_experts must be >= 1, integration_steps and "
                             "hold_outline_voxels >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"], d["channels"] = list(self.input_shape), list(self.channels)
        for option in ("hold_outline_voxels", "centre_field"):  # cards and checkpoint fingerprints of
            if not d[option]:                                      # earlier versions stay valid
                del d[option]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SimulatorArchitecture":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["input_shape"] = tuple(int(v) for v in known["input_shape"])
        if "channels" in known:
            known["channels"] = tuple(int(v) for v in known["channels"])
        return cls(**known)


class _Block(nn.Module):
    """ConditionalConv3d -> LeakyReLU (leaky: no unit of the simulator can die)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, n_experts: int):
        super().__init__()
        self.conv = ConditionalConv3d(in_ch, out_ch, 3, stride=stride, padding=1, n_experts=n_experts)

    def forward(self, x, c):
        return F.leaky_relu(self.conv(x, c), 0.2)


class ConditionalUNet(nn.Module):
    def __init__(self, arch: SimulatorArchitecture):
        super().__init__()
        arch.check()
        self.arch = arch
        ch, e = arch.channels, arch.n_experts
        self.inc = _Block(1, ch[0], 1, e)
        self.down = nn.ModuleList(_Block(ch[i], ch[i + 1], 2, e) for i in range(len(ch) - 1))
        self.up = nn.ModuleList(_Block(ch[i + 1] + ch[i], ch[i], 1, e) for i in reversed(range(len(ch) - 1)))
        self.head = nn.Conv3d(ch[0], 3, 3, padding=1)
        # near-zero initial field: training starts from the identity warp (as VoxelMorph)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def _unet(self, x, c):
        multiple = 2 ** (len(self.arch.channels) - 1)
        shape = x.shape[2:]
        pad = [p for s in reversed(shape) for p in (0, (-s) % multiple)]
        x = F.pad(x, pad)
        skips = [self.inc(x, c)]
        for block in self.down:
            skips.append(block(skips[-1], c))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[2:], mode="trilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1), c)
        out = self.head(y)
        return out[:, :, :shape[0], :shape[1], :shape[2]]

    def forward(self, x: torch.Tensor, c: torch.Tensor, brain: torch.Tensor | None = None) -> torch.Tensor:
        """Displacement field (B, 3, D, H, W) in voxels of x; c: (B,) of +1/-1; ``brain``
        (B, 1, D, H, W) the brain masks, needed with ``hold_outline_voxels`` or ``centre_field``."""
        factor = self.arch.field_downsample
        small = F.avg_pool3d(x, factor, ceil_mode=True) if factor > 1 else x
        field = self._unet(small, c)
        if (self.arch.hold_outline_voxels or self.arch.centre_field) and brain is None:
            raise ValueError("this simulator holds the brain outline or centres its field: it needs the brain mask")
        if self.arch.hold_outline_voxels:
            small_brain = brain.to(x.dtype)
            if factor > 1:  # on the U-Net's grid
                small_brain = F.avg_pool3d(small_brain, factor, ceil_mode=True)
            field = field * interior_weight(small_brain, self.arch.hold_outline_voxels)
        if self.arch.diffeomorphic:
            field = integrate_velocity(field, self.arch.integration_steps)
        if factor > 1:  # displacements are in voxels: scale them with the grid
            field = F.interpolate(field, size=x.shape[2:], mode="trilinear", align_corners=True) * factor
        if self.arch.centre_field:  # after integration: a constant shift keeps det(I + grad u) as it is
            field = field - brain_mean(field, brain.to(x.dtype))
        return field


def brain_mean(field: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1, 1, 1): the mean of each displacement component inside each brain mask."""
    weight = (brain > 0.5).to(field.dtype)
    return (field * weight).sum(dim=(2, 3, 4), keepdim=True) / weight.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)


def interior_weight(brain: torch.Tensor, margin: int) -> torch.Tensor:
    """1 deep inside the mask, falling to 0 over ``margin`` voxels, exactly 0 on the mask's
    outermost voxel layer and outside: the mask eroded by ``margin`` voxels, then
    box-smoothed over ``margin - 1`` voxels either side."""
    eroded = -F.max_pool3d(-(brain > 0.5).to(brain.dtype), 2 * margin + 1, stride=1, padding=margin)
    return F.avg_pool3d(eroded, 2 * margin - 1, stride=1, padding=margin - 1, count_include_pad=True)
