"""The three training modes compared in the Graz+ paper, on one architecture.

* ``plain``: cross-entropy on the image.
* ``masked``: cross-entropy on image * brain mask (masked-input CNN).
* ``grazplus``: cross-entropy + lambda * (-sum(mask * R)), R the network's own z+ map
  started from the softmax vector, so the second term is minus the relevance fraction
  inside the mask. Both terms are weighted per sample by the class weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lrp import masked_relevance

MODES = ("plain", "masked", "grazplus")


@dataclass
class StepOutput:
    """Per-sample terms of one forward pass (loss is the batch-mean weighted total)."""

    loss: torch.Tensor
    logits: torch.Tensor
    ce: torch.Tensor
    relevance_inside: torch.Tensor | None  # sum(mask * R) per sample
    relevance_total: torch.Tensor | None  # sum(R) per sample


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def check_mode_for_architecture(mode: str, architecture: str) -> None:
    """The Graz+ loss needs the z+ forward sweep of the Graz+ network (biases <= 0)."""
    if mode == "grazplus" and architecture != "grazplus":
        raise ValueError(
            f"training mode 'grazplus' needs the 'grazplus' architecture, not {architecture!r}: its "
            "relevance loss relies on z+ with non-positive biases and no batch norm; train "
            f"{architecture!r} in mode 'plain' or 'masked'"
        )


def _untracked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nan = torch.full((x.shape[0],), float("nan"), device=x.device, dtype=x.dtype)
    return nan, nan


def compute_loss(
    model: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    y: torch.Tensor,
    sample_weight: torch.Tensor,
    mode: str,
    relevance_weight: float = 1.0,
    track_relevance: bool = True,
) -> StepOutput:
    """Loss of one (micro-)batch in the given mode.

    ``track_relevance`` computes the relevance terms for logging in the modes whose
    loss does not need them (``plain``/``masked``), in an extra no-grad sweep; it is NaN
    for architectures other than the Graz+ network.
    """
    check_mode(mode)
    inputs = x * mask if mode == "masked" else x
    if mode == "grazplus":
        logits, inside, total = masked_relevance(model, inputs, mask)
    else:
        logits, inside, total = model(inputs), None, None
        if track_relevance and hasattr(model, "lrp_layers"):
            with torch.no_grad():
                _, inside, total = masked_relevance(model, inputs, mask)
        elif track_relevance:  # other architectures: NaN (explain them with grazbids.explain)
            inside, total = _untracked(x)
    ce = F.cross_entropy(logits, y, reduction="none")
    per_sample = ce - relevance_weight * inside if mode == "grazplus" else ce
    loss = (sample_weight * per_sample).mean()
    return StepOutput(loss, logits, ce.detach(), inside, total)
