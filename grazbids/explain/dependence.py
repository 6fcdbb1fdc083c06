"""Decision dependence: does the model's decision change when a region of the input is replaced?

Heat maps say where relevance falls, not what the decision rests on: a shortcut outside the
brain that acts through inhibitory paths, or as a small decisive difference on top of a
brain-wide offset, hardly shows in a z+ map. Replacing the region and watching the output
measures reliance directly (region perturbation, Samek et al. 2017): for every sample, the
probability of the class predicted on the intact input before and after the replacement,
and whether the predicted class flips.

Replacements (``FILLS``): ``zero`` (the region set to 0, the background of a skull-stripped
scan) and ``mean`` (the region set to a reference image, e.g. the training cohort's mean
image in template space: a "typical" outside that carries no individual's artefact).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FILLS = ("zero", "mean")
# A mode whose held-out decisions flip this often when the outside of the brain is replaced
# relies on what lies outside the brain (docs/usage.md, "Decision dependence").
FLIP_RATE_WARNING = 0.10
# advice with that warning, measured by benchmarks/shortcut_evidence.py (docs/simulation.md, "A cohort where
# plain follows the shortcut")
FLIP_RATE_ADVICE = ("On a simulated cohort with an artefact outside the brain, mode grazplus with --outside-penalty "
                    "invariance (its default) learned the effect in 5 of 5 runs; plain and the paper's Graz+ "
                    "(--outside-penalty none) followed the artefact in 4 of 5 (docs/simulation.md).")
# advice with the near-chance warning, measured by benchmarks/training_recipe.py
# (docs/simulation.md, "Training recipe")
NEAR_CHANCE_ADVICE = ("On simulated cohorts, 200 training participants learned the effect at the defaults where 40 "
                      "did not; with few participants, --learning-rate 1e-3 --accumulation-steps 1 learned more often "
                      "than the default 1e-4 (docs/simulation.md, Training recipe).")


def replace_region(x: torch.Tensor, region: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """``x`` with the voxels where ``region`` is 1 replaced by ``fill`` (soft regions blend)."""
    region = region.to(x.dtype)
    return x * (1 - region) + region * fill


@dataclass
class Dependence:
    """Per sample: probability of the class predicted on the intact input, before and after."""

    predicted: np.ndarray  # (N,) class index on the intact input
    before: np.ndarray  # (N,) its probability on the intact input
    after: np.ndarray  # (N,) its probability with the region replaced
    predicted_after: np.ndarray  # (N,) class index with the region replaced

    @property
    def change(self) -> np.ndarray:
        """after - before (negative: the region supported the decision)."""
        return self.after - self.before

    @property
    def flipped(self) -> np.ndarray:
        return (self.predicted_after != self.predicted).astype(np.float64)

    def rows(self, prefix: str) -> list[dict[str, float]]:
        """``prob_change_<prefix>`` and ``flip_<prefix>`` per sample."""
        return [{f"prob_change_{prefix}": float(c), f"flip_{prefix}": float(f)}
                for c, f in zip(self.change, self.flipped)]


def _probabilities(model, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.softmax(model(x[i:i + batch]).float(), dim=1) for i in range(0, len(x), batch)])


def decision_dependence(model, x: torch.Tensor, region: torch.Tensor, fill: torch.Tensor | float,
                        prepare=None, batch: int = 4) -> Dependence:
    """Dependence of ``model``'s decisions at ``x`` (N, C, D, H, W) on ``region`` (N or 1, 1,
    D, H, W) replaced by ``fill``. ``prepare`` maps an image batch to the network's input
    (e.g. the masked mode's image x brain mask); the replacement acts on the image before
    it, as a change in the scan would."""
    prepare = prepare or (lambda images: images)
    was_training = model.training
    model.eval()
    try:
        before = _probabilities(model, prepare(x), batch)
        after = _probabilities(model, prepare(replace_region(x, region, fill)), batch)
    finally:
        model.train(was_training)
    predicted = before.argmax(1)
    index = predicted[:, None]
    return Dependence(predicted.cpu().numpy(), before.gather(1, index)[:, 0].cpu().numpy().astype(np.float64),
                      after.gather(1, index)[:, 0].cpu().numpy().astype(np.float64),
                      after.argmax(1).cpu().numpy())
