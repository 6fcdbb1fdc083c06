"""Fused z+ steps for the hidden 3D convolutions of the Graz+ network (used by lrp.py).

Why a module of its own: written with plain autograd ops, every elementwise step of the
z+ sweep (ReLU, z+ ratio, mask fraction) stores and re-reads full-resolution
8-channel tensors, and the profile of a Graz+ step is dominated by those passes and
by convolutions in the default memory format. Here

* every convolution runs channels-last (oneDNN's 3D convolutions, their transposes and
  weight gradients are 2-4x faster in that format on CPU),
* ``W a + b`` and ``z = W+ a`` come from one convolution with stacked weights, and
* the masked sweep has a hand-written backward (``MaskedConvStep``) that reuses the
  forward's buffers and runs the two weight/input gradients as two
  ``convolution_backward`` calls instead of autograd's graph of a dozen nodes, and
* the elementwise work between those convolutions is fused into one pass forward and
  one backward (pointwise.py: torch.compile on CPU, in-place eager ops elsewhere).

Notation for one conv layer with input activation ``a``, mask part ``u`` (the share of
``a`` whose z+ evidence lies inside the mask, K masks stacked sample-major along the
batch) and weights ``W``, ``W+ = max(W, 0)``::

    P = W a + b,  Z = W+ a,  V = W+ u
    a' = relu(P),  r = a' / Z  (0 where a' == 0),  u' = V * r

``r`` is well defined because biases are <= 0: ``a' > 0`` implies ``Z > 0``. The heat map
reuses ``r`` in its backward sweep: ``s = R' / Z = (W+^T s_next) * r``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .pointwise import fused_step_backward, fused_step_forward, ratio_into_

CHANNELS_LAST = torch.channels_last_3d


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the channels-last 3D layout, strides set even when C == 1 (where
    ``.contiguous(memory_format=...)`` keeps the default strides and oneDNN then picks
    its slower default-format kernels)."""
    if t.dim() != 5:
        return t
    if t.shape[1] == 1 and t.is_contiguous():
        n, _, d, h, w = t.shape
        return t.as_strided(t.shape, (d * h * w, 1, h * w, w, 1))
    return t.contiguous(memory_format=CHANNELS_LAST)


def stacked_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W+, [W; W+] channels-last, [b; 0]): one convolution gives P and Z."""
    wp = weight.clamp(min=0)
    return wp, to_channels_last(torch.cat([weight, wp])), torch.cat([bias, torch.zeros_like(bias)])


def forward_pair(layer: nn.Conv3d, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P = W a + b and Z = W+ a from one channels-last convolution (views of one buffer)."""
    _, both, bias = stacked_weights(layer.weight, layer.bias)
    pz = F.conv3d(to_channels_last(a), both, bias, layer.stride, layer.padding)
    return pz.split(layer.out_channels, dim=1)


def transposed_wplus(layer: nn.Conv3d, wp: torch.Tensor, s: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """W+^T s shaped like the layer's input, channels-last."""
    if in_shape[1] == 1 and _is_unit_stride_same(layer):
        return _transposed_to_one_channel(wp, s)
    # output_padding recovers input sizes that a stride-2 conv maps to the same output size
    out_pad = [
        in_shape[2 + d] - ((s.shape[2 + d] - 1) * layer.stride[d] - 2 * layer.padding[d] + layer.kernel_size[d])
        for d in range(3)
    ]
    return F.conv_transpose3d(to_channels_last(s), wp, None, layer.stride, layer.padding, tuple(out_pad))


def _is_unit_stride_same(layer: nn.Conv3d) -> bool:
    """Stride 1 and 'same' padding: the transpose is a convolution with the flipped kernel."""
    return all(st == 1 for st in layer.stride) and all(
        2 * p == k - 1 for p, k in zip(layer.padding, layer.kernel_size)) and layer.groups == 1


def _transposed_to_one_channel(wp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W+^T s for a stride-1 layer with ONE input channel (the network's first layer).

    oneDNN's transposed convolution to a single channel runs at a fraction of its usual
    speed (4x slower than this at 2 mm); a depthwise convolution of each channel of
    ``s`` with its own flipped kernel, summed over the channels, is the same sum."""
    channels = s.shape[1]
    flipped = wp.flip(2, 3, 4).reshape(channels, 1, *wp.shape[2:])
    per_channel = F.conv3d(to_channels_last(s), to_channels_last(flipped), None, 1,
                           [k // 2 for k in wp.shape[2:]], 1, channels)
    return to_channels_last(per_channel.sum(dim=1, keepdim=True))


def heatmap_forward(layer: nn.Conv3d, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad forward of a hidden conv layer: (a', r)."""
    p, z = forward_pair(layer, a)
    a_out = torch.relu(p)
    return a_out, ratio_into_(p, a_out, z)


def heatmap_backward(layer: nn.Conv3d, s: torch.Tensor, r_in: torch.Tensor | None, a_in: torch.Tensor) -> torch.Tensor:
    """No-grad backward step: ``s_in = (W+^T s) * r_in`` (the next ``R / Z`` below), or the
    relevance ``a_in * W+^T s`` itself at the input layer (``r_in`` None)."""
    c = transposed_wplus(layer, layer.weight.clamp(min=0), s, a_in.shape)
    return c.mul_(r_in) if r_in is not None else c.mul_(a_in)


class MaskedConvStep(torch.autograd.Function):
    """(a, u) -> (a', u') of one hidden conv layer, with a hand-written backward.

    Where ``Z == 0``, ``a' = 0`` (biases <= 0), so ``r`` and every term below are 0 there.
    On ``a' > 0``, ``V / Z = u' / a'`` (as ``u' = V a' / Z``), so the backward keeps
    neither ``V`` nor ``Z``: only ``r`` and the outputs, which the next layer keeps anyway.
    Gradients (K masks share ``a``, so their terms are summed)::

        t  = sum_K gu' * u' / a'  (= gr / Z with gr = sum_K gu' * V; 0 where a' == 0)
        gV = gu' * r
        gP = relu'(P) * (ga' + t);   gZ = -t * r
        [ga, g[W;-W+], gb] = conv backward of [gP; -gZ] w.r.t. (a, [W; -W+], [b; 0])
        [gu, gW+_V]        = conv backward of gV w.r.t. (u, W+)
        gW = gW_P + (W >= 0) * (gW+_Z + gW+_V)   (clamp's own gradient convention)

    (the sign of ``gZ`` is folded into the stacked weight, which saves a full-resolution
    pass). First-order only (no double backward); tested against autograd through the
    map and by gradcheck.
    """

    @staticmethod
    def forward(ctx, a, u, weight, bias, stride, padding, n_masks):
        _, both, bias2 = stacked_weights(weight, bias)
        a, u = to_channels_last(a), to_channels_last(u)
        pz = F.conv3d(a, both, bias2, stride, padding)
        v = F.conv3d(u, to_channels_last(weight.clamp(min=0)), None, stride, padding)
        a_out, r, u_out = fused_step_forward(pz, v, n_masks)
        # the backward needs neither Z nor V: on a' > 0, V / Z = u' / a' (see the class notes)
        ctx.save_for_backward(a, u, weight, a_out, r, u_out)
        ctx.conv = (tuple(stride), tuple(padding))
        ctx.n_masks = n_masks
        return a_out, u_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_a_out, g_u_out):
        a, u, weight, a_out, r, u_out = ctx.saved_tensors
        stride, padding = ctx.conv
        c = weight.shape[0]
        grads, g_v = fused_step_backward(to_channels_last(g_a_out), to_channels_last(g_u_out), u_out, a_out, r,
                                         ctx.n_masks)
        wp = weight.clamp(min=0)
        need_a, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_a, g_both, g_bias2 = torch.ops.aten.convolution_backward(
            to_channels_last(grads), a, to_channels_last(torch.cat([weight, -wp])), [2 * c], stride, padding,
            (1, 1, 1), False, (0, 0, 0), 1, (need_a, True, True))
        g_u, g_wp_v, _ = torch.ops.aten.convolution_backward(
            to_channels_last(g_v), u, to_channels_last(wp), None, stride, padding, (1, 1, 1), False, (0, 0, 0), 1,
            (need_u, True, False))
        g_weight = g_both[:c] + torch.where(weight >= 0, g_wp_v - g_both[c:], 0.0)
        return g_a, g_u, g_weight.contiguous(), g_bias2[:c], None, None, None


def masked_conv_step(layer: nn.Conv3d, a: torch.Tensor, u: torch.Tensor, n_masks: int):
    """(a', u') of a hidden conv layer through ``MaskedConvStep``."""
    return MaskedConvStep.apply(a, u, layer.weight, layer.bias, layer.stride, layer.padding, n_masks)
