"""The simulator's losses (Liu et al. 2021).

- hinge on the classifier's logit shift: relu(c (l(x) - l(S_c(x))) + margin), with l the
  log-odds of the disease class: inject (c = +1) must raise it by the margin, remove
  (c = -1) lower it;
- smoothness: mean L1 of the field's finite differences (the paper's), or their mean
  square ("l2", the diffusion regulariser of VoxelMorph; the default: on the 4 mm atrophy
  benchmark the L1 term let adversarial outline warps through, docs/counterfactual.md);
- cycle consistency: mean |S_-c(S_c(x)) - x| (L1);
- displacement (optional): mean squared displacement in voxels. Neither smoothness
  penalty charges a uniform shift, and a shift of the brain's outline moves a classifier's
  logits; this term makes the simulator pay for it.
"""
from __future__ import annotations

import torch


def disease_log_odds(logits: torch.Tensor, positive: int) -> torch.Tensor:
    """logit of the disease class minus the log-sum-exp of the others (= the log-odds of
    its softmax probability; logit difference for two classes)."""
    others = torch.cat([logits[:, :positive], logits[:, positive + 1:]], dim=1)
    return logits[:, positive] - torch.logsumexp(others, dim=1)


def logit_shift_hinge(before: torch.Tensor, after: torch.Tensor, c: torch.Tensor, margin: float) -> torch.Tensor:
    """Per sample relu(c (l(x) - l(S_c(x))) + margin)."""
    return torch.relu(c * (before - after) + margin)


SMOOTHNESS_PENALTIES = ("l1", "l2")


def smoothness(u: torch.Tensor, penalty: str = "l1") -> torch.Tensor:
    """Mean absolute ("l1") or squared ("l2") finite difference of the field along the
    three axes (per sample). Differences of voxel displacements between neighbouring voxels
    are strains, so the value does not depend on the voxel size."""
    if penalty not in SMOOTHNESS_PENALTIES:
        raise ValueError(f"smoothness penalty {penalty!r}: one of {SMOOTHNESS_PENALTIES}")
    power = 1 if penalty == "l1" else 2
    diffs = [u.diff(dim=d).abs().pow(power).mean(dim=(1, 2, 3, 4)) for d in (2, 3, 4)]
    return sum(diffs) / 3.0


def displacement(u: torch.Tensor) -> torch.Tensor:
    """Mean squared displacement (voxels^2) per sample."""
    return u.pow(2).sum(dim=1).mean(dim=(1, 2, 3))


def cycle_loss(x: torch.Tensor, x_cycled: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |x - S_-c(S_c(x))| per sample (inside ``mask`` when given)."""
    diff = (x - x_cycled).abs()
    if mask is None:
        return diff.mean(dim=(1, 2, 3, 4))
    return (diff * mask).sum(dim=(1, 2, 3, 4)) / mask.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)
