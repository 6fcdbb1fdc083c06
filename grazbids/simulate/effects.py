"""Disease effects with a known ground truth, defined in MNI space (mm).

All effects are functions of MNI coordinates of the *patient*: the simulator maps every
output voxel to MNI space and asks the effect (`evaluate`) where to sample the healthy
anatomy (atrophy), by how much to scale the intensity (lesion) and which voxels changed
(the ground-truth mask). `mask` evaluated on the template grid gives the template-space
ground truth, so no registration is needed to score explanations there.

Atrophy (one radial map per ellipsoid, applied one after the other). With q the point in
units of the semi-axes, r = |q| and the window w(r) = (1 - r^2)^2 (0 for r >= 1), the
backward map is x -> c + (x - c) g(r), g = 1 - sigma w(r). Its Jacobian determinant is
analytic, det J = g^2 (g + r g'), so the mask needs no finite differences. `strength` e
is the relative change of linear size at the centre: an expanding region is sampled
from g(0) = 1/(1 + e), a shrinking one from g(0) = 1/(1 - e). The map is a
diffeomorphism for e <= 0.5 either way (shrinking needs sigma < 1.25). Mask: where
|log det J| > ATROPHY_LOG_JACOBIAN_TOL (local volume changed by more than ~5 %) or the
anatomy moved by more than ATROPHY_DISPLACEMENT_TOL_MM: an expanding region has a ring
of unchanged volume (det J = 1 between the expanded core and the compressed shell)
where the displacement is largest.

Lesion: intensity x (1 + c p), c = +strength (hyper) or -strength (hypo), p = 1 inside
0.8 of the ellipsoid, a cos^2 taper to 0 at 1.2, 0 beyond. `blob` shapes modulate the
radius by up to +-35 % with a smooth random function of direction. Mask: p > 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .regions import EXPAND, Ellipsoid, Region

ATROPHY_LOG_JACOBIAN_TOL = 0.05
ATROPHY_DISPLACEMENT_TOL_MM = 0.5
MAX_EFFECT_STRENGTH = 0.5
LESION_MASK_LEVEL = 0.1
LESION_CORE, LESION_EDGE = 0.8, 1.2
BLOB_AMPLITUDE = 0.35
BLOB_TERMS = 4


def atrophy_sigma(strength: float, direction: str) -> float:
    """Window amplitude sigma of g = 1 - sigma w for a linear size change `strength`."""
    if not 0.0 < strength <= MAX_EFFECT_STRENGTH:
        raise ValueError(f"atrophy strength {strength} is outside (0, {MAX_EFFECT_STRENGTH}]")
    if direction == EXPAND:
        return strength / (1.0 + strength)
    return -strength / (1.0 - strength)


@dataclass(frozen=True)
class AtrophyEffect:
    """Smooth localised expansion/shrinkage (see module doc)."""

    parts: tuple[tuple[Ellipsoid, float], ...]  # (ellipsoid, sigma)

    @classmethod
    def from_regions(cls, regions: list[Region], strength: float) -> "AtrophyEffect":
        return cls(tuple((part, atrophy_sigma(strength, region.atrophy))
                         for region in regions for part in region.parts))

    def _apply(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Backward-mapped points (3, N), log det J of the whole chain (N,) and the
        indices of the points it moved."""
        out = np.array(points, dtype=float, copy=True)
        log_det = np.zeros(points.shape[1])
        touched = []
        for ellipsoid, sigma in self.parts:
            near = ellipsoid.near(out)
            if near.size == 0:
                continue
            sub = out[:, near]
            r = np.linalg.norm(ellipsoid.normalised(sub), axis=0)
            near, sub, r = near[r < 1.0], sub[:, r < 1.0], r[r < 1.0]
            one_minus = 1.0 - r**2
            window = one_minus**2
            window_slope = -4.0 * r * one_minus  # dw/dr
            g = 1.0 - sigma * window
            r_g_slope = -sigma * r * window_slope
            centre = np.asarray(ellipsoid.centre, dtype=float)[:, None]
            out[:, near] = centre + (sub - centre) * g
            log_det[near] += 2.0 * np.log(g) + np.log(g + r_g_slope)
            touched.append(near)
        return out, log_det, np.unique(np.concatenate(touched)) if touched else np.zeros(0, int)

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(healthy points to sample, intensity factor or None, ground-truth mask)."""
        healthy, log_det, touched = self._apply(points)
        mask = np.abs(log_det) > ATROPHY_LOG_JACOBIAN_TOL
        moved = np.linalg.norm(healthy[:, touched] - points[:, touched], axis=0)
        mask[touched[moved > ATROPHY_DISPLACEMENT_TOL_MM]] = True
        return healthy, None, mask

    def backward(self, points: np.ndarray) -> np.ndarray:
        return self._apply(points)[0]

    def log_jacobian(self, points: np.ndarray) -> np.ndarray:
        return self._apply(points)[1]

    def mask(self, points: np.ndarray) -> np.ndarray:
        return self.evaluate(points)[2]


@dataclass(frozen=True)
class BlobShape:
    """A smooth random radius modulation: 1 + a * mean_k cos(pi w_k . u + phi_k)."""

    frequencies: np.ndarray  # (BLOB_TERMS, 3)
    phases: np.ndarray  # (BLOB_TERMS,)

    @classmethod
    def random(cls, rng: np.random.Generator) -> "BlobShape":
        directions = rng.normal(size=(BLOB_TERMS, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return cls(directions * rng.uniform(0.8, 1.6, size=(BLOB_TERMS, 1)),
                   rng.uniform(0.0, 2.0 * np.pi, size=BLOB_TERMS))

    def radius_scale(self, q: np.ndarray) -> np.ndarray:
        """(3, N) normalised points -> (N,) radius factor in [1 - a, 1 + a]."""
        unit = q / np.maximum(np.linalg.norm(q, axis=0), 1e-9)
        waves = np.cos(np.pi * (self.frequencies @ unit) + self.phases[:, None])
        return 1.0 + BLOB_AMPLITUDE * waves.mean(axis=0)


@dataclass(frozen=True)
class LesionEffect:
    """Hypo- or hyperintense ellipsoids/blobs (see module doc)."""

    parts: tuple[Ellipsoid, ...]
    contrast: float  # relative intensity change at the core, e.g. -0.5
    shapes: tuple[BlobShape | None, ...] = field(default=())

    @classmethod
    def from_regions(cls, regions: list[Region], strength: float, contrast: str,
                     shape: str, rng: np.random.Generator | None) -> "LesionEffect":
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"lesion strength {strength} is outside (0, 1]")
        parts = tuple(part for region in regions for part in region.parts)
        shapes = tuple(BlobShape.random(rng) if shape == "blob" else None for _ in parts)
        return cls(parts, strength if contrast == "hyper" else -strength, shapes)

    def profile(self, points: np.ndarray) -> np.ndarray:
        """Lesion weight p in [0, 1] at (3, N) MNI points (the largest over the parts)."""
        weight = np.zeros(points.shape[1])
        for ellipsoid, shape in zip(self.parts, self.shapes or (None,) * len(self.parts)):
            grown = Ellipsoid(ellipsoid.centre,
                              tuple(LESION_EDGE * (1 + BLOB_AMPLITUDE) * r for r in ellipsoid.radii))
            near = grown.near(points)
            if near.size == 0:
                continue
            q = ellipsoid.normalised(points[:, near])
            rho = np.linalg.norm(q, axis=0)
            if shape is not None:
                rho = rho / shape.radius_scale(q)
            taper = np.clip((rho - LESION_CORE) / (LESION_EDGE - LESION_CORE), 0.0, 1.0)
            weight[near] = np.maximum(weight[near], np.cos(0.5 * np.pi * taper) ** 2)
        return weight

    def evaluate(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points to sample: unchanged, intensity factor, ground-truth mask)."""
        weight = self.profile(points)
        return points, 1.0 + self.contrast * weight, weight > LESION_MASK_LEVEL

    def mask(self, points: np.ndarray) -> np.ndarray:
        return self.profile(points) > LESION_MASK_LEVEL


Effect = AtrophyEffect | LesionEffect
