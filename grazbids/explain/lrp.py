"""Layer-wise relevance propagation over the layer chain of any supported model.

One forward pass through the chain stores each step's input; relevance then goes back
step by step: Conv3d/Linear by the rule chosen for that layer (``lrp_rules``), max
pooling winner-take-all (the gradient routing of max pooling), average pooling in
proportion to the pooled inputs, flatten by reshaping, ReLU/dropout/identity unchanged.
The start relevance is that of the Graz+ engine (``grazbids.engine.lrp.start_relevance``):
the softmax vector, or one class's probability.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..engine.lrp import safe_divide, start_relevance
from .graph import Affine, Flatten, PassThrough, Pool, Step, layer_chain
from .lrp_rules import Rule, rule_named
from .model_state import evaluation_mode
from .targets import Target

# (layer, is_first_weighted_layer) -> rule
RuleChooser = Callable[[Affine, bool], Rule]


def _input_gradient(fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        leaf = a.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf), leaf, grad_output)
    return grad


def _pool_relevance(pool: Pool, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    if pool.kind == "max":  # winner takes all: each output's relevance goes to its maximum
        return _input_gradient(pool.fn, a, relevance)
    s = safe_divide(relevance, pool.fn(a))  # proportional to each input's share of the mean
    return a * _input_gradient(pool.fn, a, s)


def propagate(chain: list[Step], x: torch.Tensor, target: Target, choose: RuleChooser) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance shaped like ``x`` and the logits, for a chain from ``graph.layer_chain``."""
    inputs = []
    a = x
    for step in chain:
        inputs.append(a)
        a = step.forward(a)
    logits = a
    if logits.dim() != 2:
        raise ValueError(f"the model's output has shape {tuple(logits.shape)}; LRP needs (batch, classes) logits")
    first = next((k for k, step in enumerate(chain) if isinstance(step, Affine)), None)
    relevance = start_relevance(logits, target)
    for k in reversed(range(len(chain))):
        step, a = chain[k], inputs[k]
        if isinstance(step, Affine):
            relevance = choose(step, k == first)(step, a, relevance)
        elif isinstance(step, Pool):
            relevance = _pool_relevance(step, a, relevance)
        elif isinstance(step, Flatten):
            relevance = relevance.reshape(a.shape)
        elif not isinstance(step, PassThrough):
            raise TypeError(f"unknown step {step!r}")
    return relevance, logits


def same_rule(name: str, **params) -> RuleChooser:
    rule = rule_named(name, **params)
    return lambda layer, is_first: rule


def composite_rule(x: torch.Tensor, epsilon: float, alpha: float, beta: float, first_rule: str,
                   low: float | None, high: float | None) -> RuleChooser:
    """Epsilon for dense layers, alpha-beta for convolutions, z-beta or flat at the first
    weighted layer. z-beta bounds default to each sample's data range (min, max of x)."""
    dense = rule_named("epsilon", eps=epsilon)
    conv = rule_named("alphabeta", alpha=alpha, beta=beta)
    if first_rule == "zbeta":
        dims = tuple(range(1, x.dim()))
        lo = x.amin(dim=dims, keepdim=True) if low is None else torch.as_tensor(low, dtype=x.dtype, device=x.device)
        hi = x.amax(dim=dims, keepdim=True) if high is None else torch.as_tensor(high, dtype=x.dtype, device=x.device)
        if bool((lo > x.amin(dim=dims, keepdim=True)).any()) or bool((hi < x.amax(dim=dims, keepdim=True)).any()):
            raise ValueError(f"z-beta bounds [{low}, {high}] do not contain the input's range")
        first = rule_named("zbeta", low=lo, high=hi)
    elif first_rule == "flat":
        first = rule_named("flat")
    else:
        raise ValueError(f"unknown first-layer rule {first_rule!r}: use 'zbeta' or 'flat'")

    def choose(layer: Affine, is_first: bool) -> Rule:
        if is_first:
            return first
        return dense if layer.conv is None else conv

    return choose


def lrp(model: nn.Module, x: torch.Tensor, target: Target, choose: RuleChooser) -> torch.Tensor:
    """LRP map of ``model`` at ``x`` (eval mode; the model is left as it was)."""
    with evaluation_mode(model), torch.no_grad():
        chain = layer_chain(model, x)
        relevance, _ = propagate(chain, x, target, choose)
    return relevance
