"""All parameters of a simulated cohort, their defaults and their checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .confounds import SHORTCUTS
from .effects import MAX_EFFECT_STRENGTH
from .regions import DEFAULT_REGIONS, REGIONS

EFFECTS = ("atrophy", "lesion", "none")
DEFAULT_STRENGTH = {"atrophy": 0.4, "lesion": 0.5, "none": 0.0}
BACKGROUNDS = ("zero", "noise")


class ConfigError(ValueError):
    """An impossible combination of parameters (a usage error)."""


@dataclass(frozen=True)
class SimulationConfig:
    n_train: int = 32
    n_test: int = 8
    seed: int = 42
    effect: str = "atrophy"
    effect_regions: tuple[str, ...] = ()  # () = the effect's default regions
    effect_strength: float | None = None  # None = the effect's default
    effect_contrast: str = "hypo"
    lesion_shape: str = "ellipsoid"
    shortcut: str = "marker"
    shortcut_correlation: float = 0.9
    test_correlation: float = 0.5
    anatomy: tuple[str, ...] = ()  # () = the embedded template brain
    voxel_size: float = 2.0
    fov_mm: tuple[float, float, float] = (192.0, 224.0, 192.0)
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 10.0
    deformation_mm: float = 2.0
    bias_strength: float = 0.2
    noise: float = 0.03
    intensity_scale: tuple[float, float] = (0.5, 2.0)
    background: str = "zero"

    @property
    def regions(self) -> tuple[str, ...]:
        if self.effect == "none":
            return ()
        return self.effect_regions or DEFAULT_REGIONS[self.effect]

    @property
    def strength(self) -> float:
        return DEFAULT_STRENGTH[self.effect] if self.effect_strength is None else self.effect_strength

    def parameters(self) -> dict:
        """Every parameter with its resolved value (for the README and sidecars)."""
        values = asdict(self)
        values["effect_regions"] = list(self.regions)
        values["effect_strength"] = self.strength
        values["anatomy"] = list(self.anatomy) or ["embedded MNI152NLin2009aSym res-2 brain"]
        return values

    def validate(self) -> "SimulationConfig":
        """Raise ConfigError naming the first impossible value."""
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        need(self.n_train >= 2, f"--n-train {self.n_train}: at least 2 (one per class)")
        need(self.n_test >= 0, f"--n-test {self.n_test}: must not be negative")
        need(self.n_test == 0 or self.n_test >= 2, f"--n-test {self.n_test}: 0 or at least 2")
        need(self.seed >= 0, f"--seed {self.seed}: must not be negative")
        need(self.effect in EFFECTS, f"--effect {self.effect}: choose from {EFFECTS}")
        for name in self.effect_regions:
            need(name in REGIONS, f"--effect-region {name}: choose from {', '.join(REGIONS)}")
        limit = MAX_EFFECT_STRENGTH if self.effect == "atrophy" else 1.0
        need(self.effect == "none" or 0.0 < self.strength <= limit,
             f"--effect-strength {self.strength}: must be in (0, {limit:g}] for {self.effect}")
        need(self.effect_contrast in ("hypo", "hyper"),
             f"--effect-contrast {self.effect_contrast}: hypo or hyper")
        need(self.lesion_shape in ("ellipsoid", "blob"),
             f"--lesion-shape {self.lesion_shape}: ellipsoid or blob")
        need(self.shortcut in SHORTCUTS, f"--shortcut {self.shortcut}: choose from {SHORTCUTS}")
        for option, value in (("--shortcut-correlation", self.shortcut_correlation),
                              ("--test-correlation", self.test_correlation)):
            need(0.0 <= value <= 1.0, f"{option} {value}: a fraction of participants, "
                                      "must be in [0, 1]")
        need(0.5 <= self.voxel_size <= 8.0, f"--voxel-size {self.voxel_size}: 0.5 to 8 mm")
        need(len(self.fov_mm) == 3 and all(100.0 <= f <= 400.0 for f in self.fov_mm),
             f"--fov {self.fov_mm}: three sizes of 100 to 400 mm")
        need(0.0 <= self.max_rotation_deg <= 45.0, f"--max-rotation {self.max_rotation_deg}: 0-45")
        need(0.0 <= self.max_translation_mm <= 30.0,
             f"--max-translation {self.max_translation_mm}: 0-30 mm")
        need(0.0 <= self.deformation_mm <= 6.0, f"--deformation {self.deformation_mm}: 0-6 mm")
        need(0.0 <= self.bias_strength <= 1.0, f"--bias-strength {self.bias_strength}: 0-1")
        need(0.0 <= self.noise <= 0.5, f"--noise {self.noise}: 0-0.5")
        low, high = self.intensity_scale
        need(0.05 <= low <= high <= 10.0,
             f"--intensity-scale {low} {high}: 0.05 <= MIN <= MAX <= 10")
        need(self.background in BACKGROUNDS, f"--background {self.background}: zero or noise")
        need(not (self.shortcut == "padding" and self.background == "zero"),
             "--shortcut padding needs --background noise: zero-filling a background that "
             "is already zero changes nothing")
        return self
