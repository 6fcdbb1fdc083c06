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
* ``signed``: the share of absolute signed relevance outside the brain,
  sum_outside |R| / sum |R|, with R the LRP-epsilon map of the logit difference between the
  true class and the others (contrastive; the epsilon rule keeps negative, inhibitory
  evidence that z+ drops). Needs the Graz+ network (``lrp_layers``); one differentiable
  relevance sweep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OUTSIDE_PENALTIES = ("none", "invariance", "gradient", "signed")
SIGNED_EPSILON = 0.01  # as the explain module's LRP-epsilon default


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


def contrastive_start(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Output relevance of the logit difference z_y - mean of the other classes' logits."""
    n_classes = logits.shape[1]
    sign = torch.full_like(logits, -1.0 / (n_classes - 1))
    sign.scatter_(1, y[:, None], 1.0)
    return logits * sign


def epsilon_relevance(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      eps: float = SIGNED_EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed LRP-epsilon map (shaped like ``x``) of the contrastive logit difference, and
    the logits; plain differentiable ops. R_i = sum_j a_i w_ij / (z_j + eps sign z_j) R_j,
    z_j = sum_i a_i w_ij + b_j, sign(0) = 1."""
    if not hasattr(model, "lrp_layers"):
        raise TypeError(f"the signed outside penalty needs the Graz+ network, got {type(model).__name__}")
    layers = model.lrp_layers()
    inputs, pre = [], []
    a = x
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            a = a.flatten(1)
        inputs.append(a)
        z = layer(a)
        pre.append(z)
        a = torch.relu(z) if i < len(layers) - 1 else z
    logits = a
    relevance = contrastive_start(logits, y)
    for layer, a, z in zip(reversed(layers), reversed(inputs), reversed(pre)):
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)  # where() of two Python floats is float32
        s = relevance.reshape(z.shape) / (z + eps * sign)
        if isinstance(layer, nn.Linear):
            back = s @ layer.weight
        else:
            back = torch.nn.grad.conv3d_input(a.shape, layer.weight, s, layer.stride, layer.padding)
        relevance = a * back
    return relevance.reshape(x.shape), logits


def signed_penalty(model: nn.Module, x: torch.Tensor, outside: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample share of |R| (``epsilon_relevance``) in the ``outside`` region."""
    magnitude = epsilon_relevance(model, x, y)[0].abs().flatten(1)
    return (magnitude * outside.flatten(1)).sum(dim=1) / magnitude.sum(dim=1).clamp_min(torch.finfo(x.dtype).tiny)


def outside_penalty(kind: str, model, x: torch.Tensor, outside: torch.Tensor, logits: torch.Tensor,
                    y: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "invariance":
        return invariance_penalty(model, x, outside, logits)
    if kind == "gradient":
        return gradient_penalty(x, outside, logits)
    if kind == "signed":
        return signed_penalty(model, x, outside, y)
    raise ValueError(f"no penalty for {kind!r}")
