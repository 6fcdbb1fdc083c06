"""Deep Taylor decomposition with the z+ rule, as in Graz+.

For every weighted layer with input activation ``a`` and weights ``W``::

    W+ = max(W, 0);  z = W+ a  (no bias);  s = R / z  (0 where z == 0)
    R_in = a * (W+^T s)

Bias, ReLU and flatten pass relevance through. The rule is applied in every layer,
the input layer included (valid because inputs are non-negative).

Two ways to get relevance out of one forward pass:

* ``zplus_heatmap``: the full map, by the backward redistribution above. Plain torch
  ops, so it is differentiable (``create_graph`` is never needed) and, under
  ``torch.inference_mode``, a fast no-grad path for inference.
* ``masked_relevance``: only ``sum(mask * R)`` and ``sum(R)`` per sample, which is all the
  Graz+ loss needs. Because every step of z+ is linear in the relevance above it,
  ``sum(mask * R_in) = sum(R_out * (W+ (mask * a)) / z)``: the fraction of each unit's z+
  evidence that comes from inside the mask can be carried *forward* with the
  activations. That avoids the full-resolution backward sweep and the storage of the
  map; the value (and its gradient) equals the one through ``zplus_heatmap``.

Both run their hidden conv layers through the fused channels-last steps of
``zplus_conv.py`` (the no-grad map; the masked sweep, with a hand-written backward);
the plain-ops code here stays the differentiable reference they are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import zplus_conv

Target = str | int | torch.Tensor


def stabilised(z: torch.Tensor) -> torch.Tensor:
    """z with its zeros replaced by ones, for use as a z+ denominator.

    z+ denominators are sums of non-negative terms a_i * W+_ji, so z_j == 0 means every
    such term is 0: whatever s_j = R_j / z_j is, it contributes a_i * W+_ji * s_j = 0 to
    every input. Dividing by 1 there gives exactly the "s = 0 where z = 0" result for the
    map, with two cheap elementwise ops instead of a masked division.
    """
    return z + (z == 0).to(z.dtype)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with 0 where den == 0 (and a finite gradient there)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def start_relevance(logits: torch.Tensor, target: Target = "softmax") -> torch.Tensor:
    """Relevance at the output.

    ``"softmax"``: the whole softmax vector (Graz+ default; each map sums to ~1).
    ``"predicted"``, an int or a per-sample tensor of class indices: that class's
    probability only (the map sums to p(class)).
    """
    probs = torch.softmax(logits, dim=1)
    if isinstance(target, str):
        if target == "softmax":
            return probs
        if target != "predicted":
            raise ValueError(f"unknown LRP target {target!r}: use 'softmax', 'predicted' or a class index")
        index = probs.argmax(dim=1)
    elif isinstance(target, int):
        if not 0 <= target < probs.shape[1]:
            raise ValueError(f"class index {target} out of range for {probs.shape[1]} classes")
        index = torch.full((probs.shape[0],), target, device=probs.device, dtype=torch.long)
    else:
        index = torch.as_tensor(target, device=probs.device, dtype=torch.long).reshape(-1)
    return probs * F.one_hot(index, probs.shape[1]).to(probs.dtype)


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    if not hasattr(model, "lrp_layers"):
        raise TypeError(
            f"the Graz+ z+ sweep needs a GrazPlusNet, got {type(model).__name__}; "
            "use grazbids.explain.explain(model, x, 'zplus') for other architectures"
        )
    layers = model.lrp_layers()
    for layer in layers:
        if not isinstance(layer, (nn.Conv3d, nn.Linear)):
            raise TypeError(f"z+ LRP supports Conv3d and Linear layers, got {type(layer).__name__}")
    return layers


def _apply(layer: nn.Module, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if isinstance(layer, nn.Conv3d):
        return F.conv3d(a, weight, bias, layer.stride, layer.padding)
    return F.linear(a, weight, bias)


def _forward_pair(layer: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activation (W a + b) and z+ (W+ a) from one fused call with stacked weights."""
    w = layer.weight
    wp = w.clamp(min=0)
    bias = torch.cat([layer.bias, torch.zeros_like(layer.bias)])
    both = _apply(layer, a, torch.cat([w, wp]), bias)
    return both.split(w.shape[0], dim=1)


def _redistribute(layer: nn.Module, s: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """W+^T s, shaped like the layer's input."""
    wp = layer.weight.clamp(min=0)
    if isinstance(layer, nn.Linear):
        return s @ wp
    # oneDNN's transposed 3D convolution is about twice as fast on channels-last input
    # (measured in benchmarks/bench_engine.py); the result is the same
    s = s.contiguous(memory_format=torch.channels_last_3d)
    # output_padding recovers input sizes that a stride-2 conv maps to the same output size
    out_pad = [
        in_shape[2 + d] - ((s.shape[2 + d] - 1) * layer.stride[d] - 2 * layer.padding[d] + layer.kernel_size[d])
        for d in range(3)
    ]
    return F.conv_transpose3d(s, wp, None, layer.stride, layer.padding, tuple(out_pad))


def _flatten_if_dense(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1) if isinstance(layer, nn.Linear) and a.dim() > 2 else a


def _is_hidden_conv(layers: list[nn.Module], i: int) -> bool:
    """Conv layers followed by a ReLU take the fused channels-last path (zplus_conv.py)."""
    return isinstance(layers[i], nn.Conv3d) and i < len(layers) - 1


def _needs_graph(model: nn.Module, *tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for p in model.parameters()))


def zplus_heatmap(model: nn.Module, x: torch.Tensor, target: Target = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """z+ relevance map shaped like ``x`` and the logits.

    Differentiable with respect to the weights and the input. Under
    ``torch.inference_mode()`` / ``torch.no_grad()`` it takes a fused no-grad path (same
    map, about half the time); use that for inference.
    """
    layers = _weighted_layers(model)
    if _needs_graph(model, x):
        return _zplus_heatmap_autograd(layers, x, target)
    return _zplus_heatmap_nograd(layers, x, target)


def _zplus_heatmap_autograd(layers, x, target):
    """The map with plain differentiable torch ops (the reference for every gradient)."""
    inputs, zs = [], []
    a = x
    for i, layer in enumerate(layers):
        a = _flatten_if_dense(layer, a)
        inputs.append(a)
        pre, z = _forward_pair(layer, a)
        zs.append(z)
        a = torch.relu(pre) if i < len(layers) - 1 else pre
    logits = a
    relevance = start_relevance(logits, target)
    for layer, a, z in zip(reversed(layers), reversed(inputs), reversed(zs)):
        relevance = relevance.reshape(z.shape)
        relevance = a * _redistribute(layer, relevance / stabilised(z), a.shape)
    return relevance.reshape(x.shape), logits


def _zplus_heatmap_nograd(layers, x, target):
    """The map without autograd: hidden conv layers keep only r = a' / Z (zplus_conv.py),
    so the backward sweep is one transposed convolution and one in-place product per layer:
    ``s_l = R_l / Z_l = (W+^T s_{l+1}) * r_l``."""
    inputs, ratios = [], []  # per layer: its input; r of its output (None for dense/last)
    a = x
    for i, layer in enumerate(layers):
        a = _flatten_if_dense(layer, a)
        inputs.append(a)
        if _is_hidden_conv(layers, i):
            a, r = zplus_conv.heatmap_forward(layer, a)
            ratios.append(r)
            continue
        pre, z = _forward_pair(layer, a)
        ratios.append(None)
        zs_last = z
        a = torch.relu(pre) if i < len(layers) - 1 else pre
        if i < len(layers) - 1:
            ratios[-1] = a / stabilised(z)
    logits = a
    s = start_relevance(logits, target) / stabilised(zs_last)  # R / Z at the output layer
    for i in range(len(layers) - 1, -1, -1):
        layer, a_in = layers[i], inputs[i]
        r_in = ratios[i - 1] if i > 0 else None
        if ratios[i] is not None:  # hidden layer: s arrives flat from a dense layer above
            s = s.reshape(ratios[i].shape)
        if isinstance(layer, nn.Conv3d):
            s = zplus_conv.heatmap_backward(layer, s, r_in, a_in)
        else:
            c = s @ layer.weight.clamp(min=0)
            s = c * (r_in.reshape(c.shape) if r_in is not None else a_in)
    return s.reshape(x.shape), logits


def _per_mask(t: torch.Tensor, n_masks: int) -> torch.Tensor:
    """Repeat each sample's tensor once per mask (matching the sample-major mask stack)."""
    return t.repeat_interleave(n_masks, dim=0) if n_masks > 1 else t


def masked_relevance(
    model: nn.Module, x: torch.Tensor, mask: torch.Tensor, target: Target = "softmax"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, ``sum(mask * R)`` and ``sum(R)`` per sample, in one forward sweep.

    ``R`` is the z+ map of ``zplus_heatmap``; ``mask`` broadcasts against ``x``. A mask
    with K > 1 channels (N, K, D, H, W) gives ``sum(mask_k * R)`` for each: shape (N, K).
    Hidden conv layers run as fused channels-last steps with a hand-written backward
    (``zplus_conv.MaskedConvStep``: first-order gradients with respect to the weights),
    the dense head with plain torch ops. When ``x`` requires grad, every layer uses plain
    torch ops instead, so input gradients can be differentiated again (same values).
    """
    layers = _weighted_layers(model)
    n_masks = mask.shape[1] if mask.dim() == x.dim() else 1
    # the fused steps are first-order only; an input that requires grad (e.g. for an
    # input-gradient penalty, differentiated twice) takes the plain autograd ops
    fused = not (torch.is_grad_enabled() and x.requires_grad)
    a = x
    # the part of each activation whose z+ evidence comes from inside each mask; the K
    # masks ride along the batch dimension (sample-major) through the same layers
    inside = (x * mask).reshape(x.shape[0] * n_masks, 1, *x.shape[2:]) if n_masks > 1 else x * mask
    for i, layer in enumerate(layers):
        if fused and _is_hidden_conv(layers, i):
            a, inside = zplus_conv.masked_conv_step(layer, a, inside, n_masks)
            continue
        a = _flatten_if_dense(layer, a)
        inside = _flatten_if_dense(layer, inside)
        pre, z = _forward_pair(layer, a)
        z_inside = _apply(layer, inside, layer.weight.clamp(min=0), None)
        if i < len(layers) - 1:
            a = torch.relu(pre)
            # a > 0 implies z > 0 when biases are <= 0 (the model's constraint)
            inside = z_inside * _per_mask(a / stabilised(z), n_masks)
        else:
            logits, fraction = pre, safe_divide(z_inside, _per_mask(z, n_masks))
    relevance = start_relevance(logits, target)
    if n_masks > 1:
        inside_sum = (_per_mask(relevance, n_masks) * fraction).sum(dim=1).reshape(-1, n_masks)
    else:
        inside_sum = (relevance * fraction).sum(dim=1)
    total = (relevance * (z != 0).to(relevance.dtype)).sum(dim=1)
    return logits, inside_sum, total
