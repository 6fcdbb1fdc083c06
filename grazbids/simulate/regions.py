"""Where simulated effects go: ellipsoids at documented MNI152NLin2009aSym coordinates.

Each region is one or two ellipsoids (centre and semi-axes in mm, axis-aligned in MNI
space). For `atrophy` the ellipsoid is the support of the deformation: the structure
sits in its inner half, where the displacement is largest, and the field fades to zero
at the ellipsoid's surface. For `lesion` the ellipsoid is the lesion's extent.

The centres were checked on the embedded template (res-2 tissue maps; a test repeats
the check): the lateral ventricle centres lie in the ventricles' bodies (CSF
probability >= 0.9; the two largest CSF components near the midline span x 2-28 mm,
y -48-22 mm, z 2-28 mm on each side), the hippocampus and thalamus centres in grey
matter (GM probability 0.77 and 0.53), the white-matter sites at WM probability
>= 0.96. Hippocampus and thalamus centres follow common atlas centroids (AAL,
Harvard-Oxford); the ellipsoids are rough, axis-aligned envelopes, not segmentations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .deformation import points_in_box

EXPAND = "expand"  # atrophy enlarges the structure (ventricles: the tissue around shrinks)
SHRINK = "shrink"  # atrophy shrinks the structure itself


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in MNI space (mm)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]

    def normalised(self, points: np.ndarray) -> np.ndarray:
        """(3, N) points -> (3, N) coordinates in units of the semi-axes (|q| = 1 on the surface)."""
        centre = np.asarray(self.centre, dtype=float)[:, None]
        radii = np.asarray(self.radii, dtype=float)[:, None]
        return (points - centre) / radii

    def near(self, points: np.ndarray) -> np.ndarray:
        """Indices of the (3, N) points inside the bounding box (a cheap pre-selection)."""
        return points_in_box(points, self.centre, self.radii)


@dataclass(frozen=True)
class Region:
    name: str
    parts: tuple[Ellipsoid, ...]
    atrophy: str  # EXPAND or SHRINK
    description: str


def _pair(name: str, centre, radii, atrophy: str, what: str) -> dict[str, Region]:
    """Left, right and both-sides regions of a bilateral structure (left = negative x)."""
    x, y, z = centre
    left = Ellipsoid((-abs(x), y, z), tuple(radii))
    right = Ellipsoid((abs(x), y, z), tuple(radii))
    return {
        f"left-{name}": Region(f"left-{name}", (left,), atrophy, f"left {what}"),
        f"right-{name}": Region(f"right-{name}", (right,), atrophy, f"right {what}"),
    }


REGIONS: dict[str, Region] = {
    **_pair("lateral-ventricle", (12.0, -12.0, 24.0), (18.0, 42.0, 22.0), EXPAND,
            "lateral ventricle"),
    **_pair("hippocampus", (26.0, -22.0, -14.0), (12.0, 24.0, 12.0), SHRINK, "hippocampus"),
    **_pair("thalamus", (11.0, -18.0, 7.0), (12.0, 16.0, 12.0), SHRINK, "thalamus"),
    **_pair("frontal-wm", (24.0, 24.0, 22.0), (10.0, 10.0, 10.0), SHRINK,
            "frontal deep white matter"),
    **_pair("parietal-wm", (28.0, -45.0, 30.0), (10.0, 10.0, 10.0), SHRINK,
            "parietal deep white matter"),
}
# Both sides at once.
for _plural, _single, _what in (("lateral-ventricles", "lateral-ventricle", "both lateral ventricles"),
                                ("hippocampi", "hippocampus", "both hippocampi"),
                                ("thalami", "thalamus", "both thalami")):
    _l, _r = REGIONS[f"left-{_single}"], REGIONS[f"right-{_single}"]
    REGIONS[_plural] = Region(_plural, _l.parts + _r.parts, _l.atrophy, _what)

DEFAULT_REGIONS = {"atrophy": ("lateral-ventricles",), "lesion": ("left-frontal-wm",)}


def get_region(name: str) -> Region:
    try:
        return REGIONS[name]
    except KeyError:
        raise KeyError(f"unknown effect region '{name}'; choose from {', '.join(REGIONS)}") from None


def describe_regions() -> str:
    """One line per region, for --help and the dataset README."""
    lines = []
    for region in REGIONS.values():
        parts = "; ".join(
            f"centre ({', '.join(f'{c:g}' for c in p.centre)}) radii "
            f"({', '.join(f'{r:g}' for r in p.radii)})" for p in region.parts)
        change = "enlarges" if region.atrophy == EXPAND else "shrinks"
        lines.append(f"{region.name}: {region.description}, atrophy {change}; {parts}")
    return "\n".join(lines)
