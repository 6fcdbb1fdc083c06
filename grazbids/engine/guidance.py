"""Training terms against shortcuts outside the brain that z+ relevance does not see.

The Graz+ relevance term rewards z+ relevance inside the brain. z+ explains positive
evidence for the whole output, scaled by the input: a faint artefact outside the brain, or
one acting through inhibitory paths, carries almost no z+ relevance, so the term cannot
see it (docs/simulation.md, "Shortcut evidence"). Two terms that do not scale with input
intensity, each per sample and differentiable (a penalty added to the loss):

* ``invariance``: the decision must not change when everything outside the brain is
  replaced by 0: the Jeffreys divergence sum_k (p_k - q_k)(log p_k - log q_k) between the
  softmax outputs p (intact input) and q (outside replaced). One more forward pass.
* ``gradient``: "right for the right reasons" (Ross et al., IJCAI 2017): the squared input
  gradient of sum_k log p_k, summed over the voxels outside the brain. Double backprop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OUTSIDE_PENALTIES = ("none", "invariance", "gradient")


def check_outside_penalty(kind: str) -> str:
    if kind not in OUTSIDE_PENALTIES:
        raise ValueError(f"unknown outside penalty {kind!r}; choose one of {', '.join(OUTSIDE_PENALTIES)}")
    return kind


def invariance_penalty(model, x: torch.Tensor, outside: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Jeffreys divergence between the outputs on ``x`` and on ``x`` with the
    ``outside`` region set to 0 (``logits``: the model's output on ``x``)."""
    replaced = model(x * (1 - outside))
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(replaced, dim=1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1)


def gradient_penalty(x: torch.Tensor, outside: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over ``outside`` of the squared input gradient of sum_k log p_k.
    ``x`` must require grad and ``logits`` be computed from it."""
    (grad,) = torch.autograd.grad(F.log_softmax(logits, dim=1).sum(), x, create_graph=True)
    return (grad * outside).pow(2).flatten(1).sum(dim=1)


def outside_penalty(kind: str, model, x: torch.Tensor, outside: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if kind == "invariance":
        return invariance_penalty(model, x, outside, logits)
    if kind == "gradient":
        return gradient_penalty(x, outside, logits)
    raise ValueError(f"no penalty for {kind!r}")
