"""LRP rules for one Conv3d/Linear layer: relevance R at its output -> relevance at its input.

With ``a`` the layer input, ``w_ij`` the weight from input i to output j and ``b_j`` the
(batch-norm folded) bias; every denominator that is 0 gives 0 (no relevance through that
output):

* ``zplus``:    R_i = sum_j a_i w+_ij / (sum_i' a_i' w+_i'j) R_j            (bias ignored)
* ``epsilon``:  R_i = sum_j a_i w_ij / (z_j + eps sign(z_j)) R_j, z_j = sum_i a_i w_ij + b_j
                (sign(0) = 1)
* ``alphabeta``: R_i = sum_j (alpha (a_i w_ij)+ / z+_j - beta (a_i w_ij)- / z-_j) R_j with
                z+_j = sum_i (a_i w_ij)+ + b_j+ and z-_j = sum_i (a_i w_ij)- + b_j-
                (products split by sign, so negative inputs are handled)
* ``zbeta``:    R_i = sum_j (a_i w_ij - l_i w+_ij - h_i w-_ij) / z_j R_j for inputs bounded
                in [l, h] (first layer)
* ``flat``:     R_i = sum_j 1 / n_j R_j, n_j the number of inputs connected to j (first layer)

Every transpose ``W^T s`` is the input-gradient of the layer (``Affine.transpose``), so
strides, padding, dilation and groups need no special code.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..engine.lrp import safe_divide
from .graph import Affine

Rule = Callable[[Affine, torch.Tensor, torch.Tensor], torch.Tensor]


def zplus(layer: Affine, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    wp = layer.weight.clamp(min=0)
    s = safe_divide(relevance, layer.apply(a, wp))
    return a * layer.transpose(s, wp, a.shape)


def epsilon(layer: Affine, a: torch.Tensor, relevance: torch.Tensor, eps: float) -> torch.Tensor:
    z = layer.apply(a, layer.weight, layer.bias)
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    s = relevance / (z + eps * sign)
    return a * layer.transpose(s, layer.weight, a.shape)


def alphabeta(layer: Affine, a: torch.Tensor, relevance: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    wp, wn = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    ap, an = a.clamp(min=0), a.clamp(max=0)
    has_negative_inputs = bool((a < 0).any())  # after a ReLU there are none: skip those terms

    def part(w_same: torch.Tensor, w_other: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # (a_i w_ij) of one sign = a+ w(same sign) + a- w(other sign)
        z = layer.apply(ap, w_same, bias)
        if has_negative_inputs:
            z = z + layer.apply(an, w_other)
        s = safe_divide(relevance, z)
        out = ap * layer.transpose(s, w_same, a.shape)
        if has_negative_inputs:
            out = out + an * layer.transpose(s, w_other, a.shape)
        return out

    result = alpha * part(wp, wn, layer.bias.clamp(min=0))
    if beta != 0:
        result = result - beta * part(wn, wp, layer.bias.clamp(max=0))
    return result


def zbeta(layer: Affine, a: torch.Tensor, relevance: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``low``/``high`` broadcast against ``a`` (per sample: shape (N, 1, ...))."""
    w, wp, wn = layer.weight, layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    lo = torch.ones_like(a) * low
    hi = torch.ones_like(a) * high
    z = layer.apply(a, w) - layer.apply(lo, wp) - layer.apply(hi, wn)
    s = safe_divide(relevance, z)
    return a * layer.transpose(s, w, a.shape) - lo * layer.transpose(s, wp, a.shape) - hi * layer.transpose(s, wn, a.shape)


def flat(layer: Affine, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    ones = torch.ones_like(layer.weight)
    s = safe_divide(relevance, layer.apply(torch.ones_like(a), ones))
    return layer.transpose(s, ones, a.shape)


def rule_named(name: str, **params) -> Rule:
    """A rule with its parameters bound: ``zplus``, ``epsilon`` (eps), ``alphabeta``
    (alpha, beta), ``zbeta`` (low, high) or ``flat``."""
    rules = {"zplus": zplus, "epsilon": epsilon, "alphabeta": alphabeta, "zbeta": zbeta, "flat": flat}
    if name not in rules:
        raise ValueError(f"unknown LRP rule {name!r}; choose one of {', '.join(rules)}")
    return partial(rules[name], **params)
