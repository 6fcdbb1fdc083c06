"""How the optimised image is represented: voxel values directly, or a decorrelated
Fourier parameterisation (Olah et al., Distill 2017; used in 3D by Eitel et al. 2022).

In the Fourier form the parameters are the 3D real-FFT coefficients of the image divided
by a 1/f^decay frequency scale. Adam moves every parameter at a similar rate, so low
frequencies change the image much faster than high ones: the ascent prefers smooth,
large-scale patterns over the high-frequency noise plain voxel ascent produces. Both
forms encode and decode images exactly, so any start image and any image-space
operation (blur, clamping) can be applied between steps.
"""
from __future__ import annotations

import torch

_DIMS = (-3, -2, -1)


def spectrum_scale(shape: tuple[int, int, int], decay_power: float = 1.0) -> torch.Tensor:
    """``1 / max(f, 1/max(shape))^decay`` on the rfftn grid (f in cycles per voxel),
    scaled to unit root mean square so that ``lr`` means about the same as for voxels."""
    fz = torch.fft.fftfreq(shape[0], dtype=torch.float64)[:, None, None]
    fy = torch.fft.fftfreq(shape[1], dtype=torch.float64)[None, :, None]
    fx = torch.fft.rfftfreq(shape[2], dtype=torch.float64)[None, None, :]
    freq = torch.sqrt(fz**2 + fy**2 + fx**2)
    scale = 1.0 / freq.clamp(min=1.0 / max(shape)) ** decay_power
    return scale / scale.pow(2).mean().sqrt()


class PixelParameterisation:
    """The parameters are the voxel values."""

    name = "pixel"

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(shape)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image.detach().clone()

    def decode(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def noise(self, generator: torch.Generator) -> torch.Tensor:
        """Standardised white noise, shape (1, 1, *shape), float64 on the CPU."""
        return torch.randn((1, 1, *self.shape), generator=generator, dtype=torch.float64)

    def describe(self) -> dict:
        return {"Type": self.name}


class FourierParameterisation:
    """The parameters are ``rfftn(image, norm="ortho") / scale`` as real pairs."""

    name = "fourier"

    def __init__(self, shape: tuple[int, int, int], decay_power: float = 1.0):
        self.shape = tuple(shape)
        self.decay_power = float(decay_power)
        self._scale64 = spectrum_scale(self.shape, self.decay_power)
        self._scales: dict[tuple, torch.Tensor] = {}

    def _scale(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._scales:
            self._scales[key] = self._scale64.to(device=like.device, dtype=like.dtype)
        return self._scales[key]

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfftn(image.detach(), dim=_DIMS, norm="ortho")
        return torch.view_as_real(spectrum / self._scale(image)).contiguous()

    def decode(self, params: torch.Tensor) -> torch.Tensor:
        spectrum = torch.view_as_complex(params) * self._scale(params)
        return torch.fft.irfftn(spectrum, s=self.shape, dim=_DIMS, norm="ortho")

    def noise(self, generator: torch.Generator) -> torch.Tensor:
        """Standardised 1/f-coloured noise (white noise in parameter space), like
        `PixelParameterisation.noise` in shape, dtype and device."""
        n_freq = self._scale64.shape
        params = torch.randn((1, 1, *n_freq, 2), generator=generator, dtype=torch.float64)
        coloured = self.decode(params)
        return (coloured - coloured.mean()) / coloured.std()

    def describe(self) -> dict:
        return {"Type": self.name, "DecayPower": self.decay_power,
                "Scale": "1 / max(f, 1/max(shape))^DecayPower, unit RMS; rfftn norm='ortho'"}


def make_parameterisation(shape: tuple[int, int, int], fourier: bool, decay_power: float = 1.0):
    if fourier:
        return FourierParameterisation(shape, decay_power)
    return PixelParameterisation(shape)
