"""Geometry of one simulated scan: output grid, head pose, smooth random fields.

Random smooth fields are cubic B-splines on a coarse control grid, evaluated on the
output grid as a tensor product (three small matrix products per component), which is
exact, C2-smooth and far cheaper than a spline interpolation per voxel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.spatial.transform import Rotation


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape and the voxel-to-mm (RAS) affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def centred(cls, fov_mm, voxel_mm: float) -> "Grid":
        """Isotropic RAS grid covering `fov_mm`, its centre at the scanner origin."""
        shape = tuple(max(1, int(round(f / voxel_mm))) for f in fov_mm)
        affine = np.diag([voxel_mm] * 3 + [1.0])
        affine[:3, 3] = -0.5 * voxel_mm * (np.asarray(shape) - 1)
        return cls(shape, affine)

    @property
    def zooms(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @cached_property
    def points(self) -> np.ndarray:
        """(3, N) mm coordinates of all voxel centres (C order); computed once, read-only."""
        index = np.indices(self.shape, dtype=float).reshape(3, -1)
        points = self.affine[:3, :3] @ index + self.affine[:3, 3:]
        points.setflags(write=False)
        return points

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """(3, N) mm -> (3, N) fractional voxel indices."""
        return apply_affine(np.linalg.inv(self.affine), points)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """4x4 `matrix` applied to (3, N) points."""
    return matrix[:3, :3] @ points + matrix[:3, 3:]


def points_in_box(points: np.ndarray, centre, half_size) -> np.ndarray:
    """Indices of the (3, N) points within `half_size` of `centre` along every axis
    (one axis at a time, each on the survivors of the previous one)."""
    index = np.flatnonzero(np.abs(points[0] - centre[0]) <= half_size[0])
    for axis in (1, 2):
        index = index[np.abs(points[axis, index] - centre[axis]) <= half_size[axis]]
    return index


@dataclass(frozen=True)
class Pose:
    """Rigid head pose: rotations about x, y, z (degrees, extrinsic) and a translation (mm)."""

    angles_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]

    @classmethod
    def random(cls, rng: np.random.Generator, max_rotation_deg: float,
               max_translation_mm: float) -> "Pose":
        angles = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
        shift = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
        return cls(tuple(float(a) for a in angles), tuple(float(s) for s in shift))

    def matrix(self, head_centre: np.ndarray) -> np.ndarray:
        """Subject frame -> scanner frame: y = R (s - head_centre) + translation."""
        rotation = Rotation.from_euler("xyz", self.angles_deg, degrees=True).as_matrix()
        out = np.eye(4)
        out[:3, :3] = rotation
        out[:3, 3] = np.asarray(self.translation_mm) - rotation @ np.asarray(head_centre)
        return out


def bspline_basis(n_out: int, spacing_vox: float) -> np.ndarray:
    """(n_out, n_ctrl) cubic B-spline weights; control points every `spacing_vox` voxels,
    one extra on each side so that every voxel has its four supporting points."""
    t = np.arange(n_out) / spacing_vox + 1.0
    n_ctrl = int(np.floor(t[-1])) + 3
    base = np.floor(t).astype(int)
    frac = t - base
    weights = np.stack([(1 - frac) ** 3 / 6,
                        (3 * frac**3 - 6 * frac**2 + 4) / 6,
                        (-3 * frac**3 + 3 * frac**2 + 3 * frac + 1) / 6,
                        frac**3 / 6], axis=1)
    basis = np.zeros((n_out, n_ctrl))
    for k in range(4):
        np.add.at(basis, (np.arange(n_out), base - 1 + k), weights[:, k])
    return basis


def smooth_random_field(rng: np.random.Generator, shape, voxel_mm: float, spacing_mm: float,
                        components: int = 1) -> np.ndarray:
    """(components, *shape) smooth field: i.i.d. N(0, 1) control values, cubic B-spline."""
    bases = [bspline_basis(n, spacing_mm / voxel_mm) for n in shape]
    coefficients = rng.standard_normal((components,) + tuple(b.shape[1] for b in bases))
    field = np.einsum("cabk,kz->cabz", coefficients, bases[2].T, optimize=True)
    field = np.einsum("cakz,ky->cayz", field, bases[1].T, optimize=True)
    field = np.einsum("ckyz,kx->cxyz", field, bases[0].T, optimize=True)
    return field
