"""The method registry, the one entry point ``explain`` and sidecar descriptions."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .gradcam import grad_cam
from .gradients import gradient, gradient_x_input, guided_backprop, integrated_gradients
from ..engine.lrp import zplus_heatmap
from ..engine.model import GrazPlusNet
from .lrp import composite_rule, lrp, same_rule
from .model_state import evaluation_mode
from .perturbation import meaningful_perturbation
from .targets import Target


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "lrp", "gradient", "cam" or "perturbation"
    summary: str
    defaults: dict
    run: Callable[..., torch.Tensor]  # (model, x, target, **params) -> map shaped like x


def _lrp_method(rule: str) -> Callable[..., torch.Tensor]:
    return lambda model, x, target, **params: lrp(model, x, target, same_rule(rule, **params))


def _zplus(model, x, target) -> torch.Tensor:
    """z+: the engine's fused sweep for the Graz+ network (the same rule, computed without
    building a layer chain), the general LRP for every other architecture."""
    if isinstance(model, GrazPlusNet):
        with evaluation_mode(model), torch.no_grad():
            return zplus_heatmap(model, x, target)[0]
    return lrp(model, x, target, same_rule("zplus"))


def _contrastive(model, x, target) -> torch.Tensor:
    """Contrastive z+ (CLRP, Gu et al. 2018, with the z+ rule): the map of the target class's
    probability minus the map of every other class's probability (the "dual"). z+ is linear
    in the start relevance for a fixed forward pass, so R(p_c e_c) - R(p - p_c e_c) =
    2 R(p_c e_c) - R(p): evidence that separates the class from the others, signed."""
    if isinstance(target, str) and target == "softmax":
        raise ValueError("the contrastive map explains one class against the others: use 'predicted' or a class index")
    return 2 * _zplus(model, x, target) - _zplus(model, x, "softmax")


def _composite(model, x, target, **params) -> torch.Tensor:
    return lrp(model, x, target, composite_rule(x, **params))


_LRP_START = " Start relevance: the softmax vector or one class's probability (the map sums to it where the rules conserve)."

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("zplus", "lrp", "LRP z+ (deep Taylor) in every layer, input layer included; the Graz+ heat map." + _LRP_START,
           {}, _zplus),
    Method("contrastive", "lrp", "Contrastive z+ (CLRP): the z+ map of the class's probability minus the z+ map of "
           "all other classes' probabilities; signed, sums to 2 p(class) - 1. Sees evidence that separates the "
           "classes, which the whole-output z+ map spreads over the brain.", {}, _contrastive),
    Method("epsilon", "lrp", "LRP-epsilon in every layer (bias included in the denominator)." + _LRP_START,
           {"eps": 0.01}, _lrp_method("epsilon")),
    Method("alpha1beta0", "lrp", "LRP-alpha1beta0 in every layer (positive contributions only)." + _LRP_START,
           {}, lambda model, x, target: lrp(model, x, target, same_rule("alphabeta", alpha=1.0, beta=0.0))),
    Method("alpha2beta1", "lrp", "LRP-alpha2beta1 in every layer." + _LRP_START,
           {}, lambda model, x, target: lrp(model, x, target, same_rule("alphabeta", alpha=2.0, beta=1.0))),
    Method("alphabeta", "lrp", "LRP-alpha-beta in every layer (conserving when alpha - beta = 1)." + _LRP_START,
           {"alpha": 2.0, "beta": 1.0}, _lrp_method("alphabeta")),
    Method("composite", "lrp", "LRP composite: epsilon for dense layers, alpha-beta for convolutions, z-beta "
           "(bounds: each sample's data range unless low/high are given) or flat at the first layer." + _LRP_START,
           {"epsilon": 0.01, "alpha": 2.0, "beta": 1.0, "first_rule": "zbeta", "low": None, "high": None}, _composite),
    Method("gradcam", "cam", "Grad-CAM: ReLU(sum_k alpha_k A^k) of a Conv3d layer (default the last), alpha_k the "
           "spatially averaged logit gradient, upsampled trilinearly, divided by its maximum.",
           {"layer": None, "normalise": True}, grad_cam),
    Method("guided_backprop", "gradient", "Guided backpropagation: logit gradient with every ReLU passing only "
           "positive gradients where its input was positive.", {}, guided_backprop),
    Method("gradient", "gradient", "Gradient of the class logit with respect to the input (signed saliency).",
           {}, gradient),
    Method("gradient_x_input", "gradient", "Input times the gradient of the class logit.", {}, gradient_x_input),
    Method("integrated_gradients", "gradient", "Integrated gradients of the class logit from a zero or Gaussian-"
           "blurred baseline (midpoint rule over `steps`); sums to f(x) - f(baseline).",
           {"baseline": "zero", "sigma": 4.0, "steps": 50, "chunk": 8}, integrated_gradients),
    Method("meaningful_perturbation", "perturbation", "Meaningful perturbation: 1 - the smallest smooth mask whose "
           "blur-deletion destroys the class probability (coarse mask, L1 + total variation, Adam, jitter).",
           {"iterations": 300, "lr": 0.3, "l1": 3.0, "tv": 1.0, "tv_beta": 3.0, "mask_downsample": 4,
            "mask_sigma": 1.0, "blur_sigma": 5.0, "jitter": 2, "copies": 2, "seed": 0}, meaningful_perturbation),
]}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown explanation method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def resolved_parameters(method: str, params: dict | None = None) -> dict:
    """The method's defaults updated with ``params``; unknown names are an error."""
    spec = _method(method)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(spec.defaults) or "none"
        raise ValueError(f"method {method!r} has no parameter(s) {', '.join(unknown)} (parameters: {allowed})")
    return {**spec.defaults, **params}


def explain(model: nn.Module, x: torch.Tensor, method: str, target: Target = "predicted", **params) -> torch.Tensor:
    """The map of ``method`` for ``model`` at ``x`` (N, C, D, H, W), shaped like ``x``, detached.

    ``target``: ``"predicted"`` (each sample's argmax), a class index (or one per sample),
    or ``"softmax"`` (LRP methods only: start from the whole softmax vector). The model
    is evaluated in eval mode and left as it was.
    """
    spec = _method(method)
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (N, C, D, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if isinstance(target, str) and target == "softmax" and spec.family != "lrp":
        raise ValueError(f"target 'softmax' is only defined for the LRP methods, not {method!r}; use 'predicted' or a class index")
    params = resolved_parameters(method, params)
    # callers may sit inside torch.inference_mode (as inference does); most methods need autograd
    with torch.inference_mode(False):
        x = x.clone() if x.is_inference() else x.detach()
        result = spec.run(model, x, target, **params)
    return result.detach()


def describe(method: str, params: dict | None = None, target: Target | None = None) -> dict:
    """A JSON-ready description of a map (for a BIDS sidecar): method, family, summary, all
    parameters with defaults filled in, and the target when given."""
    spec = _method(method)
    out = {"method": spec.name, "family": spec.family, "summary": spec.summary,
           "parameters": resolved_parameters(method, params)}
    if target is not None:
        out["target"] = target if isinstance(target, (str, int)) else torch.as_tensor(target).tolist()
    return out
