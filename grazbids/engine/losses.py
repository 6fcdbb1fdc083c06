"""The three training modes compared in the Graz+ paper, on one architecture.

* ``plain``: cross-entropy on the image.
* ``masked``: cross-entropy on image * brain mask (masked-input CNN).
* ``grazplus``: cross-entropy + lambda * (-sum(mask * R)), R the network's own z+ map
  started from the softmax vector, so the second term is minus the relevance fraction
  inside the mask. Both terms are weighted per sample by the class weight.

Mask guidance (Šefčík & Benešová) generalises the mask: ``mask`` may carry a second
channel, a guidance mask (lesion, tissue, ...) that replaces the brain mask in the
relevance term. ``guidance_loss`` picks the term:

* ``additive`` (Graz+): CE - lambda * sum(G * R);
* ``ratio`` (Šefčík): CE / M^p with M = sum(G * R) / sum(B * R), the share of the
  relevance inside the brain that lies in the guidance mask (differentiable here; the
  paper treated M as a constant). Samples with an empty guidance mask (e.g. controls
  without a lesion) keep the plain CE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lrp import masked_relevance, safe_divide
from .guidance import check_outside_penalty
from .guidance import outside_penalty as penalty_of
from .modes import MODES, model_input
GUIDANCE_LOSSES = ("additive", "ratio")


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


def check_mode_for_architecture(mode: str, architecture: str, outside_penalty: str = "none") -> None:
    """The Graz+ loss needs the z+ forward sweep of the Graz+ network (biases <= 0), the
    signed outside penalty its layer list."""
    if outside_penalty == "signed" and architecture != "grazplus":
        raise ValueError(f"the signed outside penalty needs the 'grazplus' architecture, not {architecture!r}")
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
    guidance_loss: str = "additive",
    guidance_power: float = 1.0,
    outside_penalty: str = "none",
    outside_penalty_weight: float = 1.0,
) -> StepOutput:
    """Loss of one (micro-)batch in the given mode.

    ``outside_penalty`` (grazbids.engine.guidance): ``invariance``, ``gradient`` or ``signed`` adds
    ``outside_penalty_weight`` x a per-sample penalty on what lies outside the brain mask.

    ``track_relevance`` computes the relevance terms for logging in the modes whose
    loss does not need them (``plain``/``masked``), in an extra no-grad sweep; it is NaN
    for architectures other than the Graz+ network.
    """
    check_mode(mode)
    if guidance_loss not in GUIDANCE_LOSSES:
        raise ValueError(f"unknown guidance loss {guidance_loss!r}; choose one of {', '.join(GUIDANCE_LOSSES)}")
    check_outside_penalty(outside_penalty)
    brain = mask[:, :1]
    inputs = model_input(x, mask, mode)
    if outside_penalty == "gradient":  # the penalty differentiates the output by the input
        inputs = inputs.detach().requires_grad_(True)

    def penalised(per_sample: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if outside_penalty == "none":
            return per_sample
        if outside_penalty == "gradient" and not torch.is_grad_enabled():  # validation: measured, not trained
            with torch.enable_grad():
                x_grad = inputs.detach().requires_grad_(True)
                penalty = penalty_of(outside_penalty, model, x_grad, 1 - brain, model(x_grad), y).detach()
        else:
            penalty = penalty_of(outside_penalty, model, inputs, 1 - brain, logits, y)
        return per_sample + outside_penalty_weight * penalty
    if mode == "grazplus" and (mask.shape[1] > 1 or guidance_loss == "ratio"):
        # brain and guidance mask (the brain twice without guidance) in one sweep
        guidance = mask[:, 1:2] if mask.shape[1] > 1 else brain
        logits, both, total = masked_relevance(model, inputs, torch.cat([brain, guidance], dim=1))
        inside_brain, inside = both[:, 0], both[:, 1]
        ce = F.cross_entropy(logits, y, reduction="none")
        if guidance_loss == "additive":
            per_sample = ce - relevance_weight * inside
        else:
            share = safe_divide(inside, inside_brain).clamp_min(1e-6)
            has_guidance = guidance.flatten(1).sum(dim=1) > 0
            per_sample = torch.where(has_guidance, ce / share.pow(guidance_power), ce)
        loss = (sample_weight * penalised(per_sample, logits)).mean()
        return StepOutput(loss, logits, ce.detach(), inside, total)
    if mode == "grazplus":
        logits, inside, total = masked_relevance(model, inputs, brain)
    else:
        logits, inside, total = model(inputs), None, None
        if track_relevance and hasattr(model, "lrp_layers"):
            with torch.no_grad():
                _, inside, total = masked_relevance(model, inputs, mask[:, -1:])
        elif track_relevance:  # other architectures: NaN (explain them with grazbids.explain)
            inside, total = _untracked(x)
    ce = F.cross_entropy(logits, y, reduction="none")
    per_sample = ce - relevance_weight * inside if mode == "grazplus" else ce
    loss = (sample_weight * penalised(per_sample, logits)).mean()
    return StepOutput(loss, logits, ce.detach(), inside, total)
