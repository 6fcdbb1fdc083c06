"""The elementwise parts of one masked z+ conv step (zplus_conv.MaskedConvStep), fused.

Why: between its convolutions, a masked step makes about ten elementwise passes over
full-resolution activations (ReLU, the z+ ratio, the mask share and their gradients).
On a CPU they are memory-bound: each pass reads and writes whole 8-channel volumes.
``torch.compile`` fuses each group into one loop; with the NaN-free divisions below, a
2 mm Graz+ step went from 2.7-2.8x to 2.36-2.44x the fastest plain step (A/B runs in
one process, docs/benchmarks.md), and the peak memory at 1 mm fell by ~0.2 GB.

Two implementations of the same arithmetic, tested equal (tests/test_pointwise.py):
``step_forward``/``step_backward`` are plain functional code for the compiler (on CPU,
compiled on first use, the compiler's own vector width); the ``*_inplace``
versions are the fastest eager code (in-place writes into preallocated buffers), used on
GPUs, with ``GRAZBIDS_NO_COMPILE=1``, and from the first compilation failure on (no C++
compiler in the image, an unsupported platform), silently apart from one debug log line.
"""
from __future__ import annotations

import logging
import os

import torch

LOG = logging.getLogger(__name__)


# Denominators are clamped at the smallest normal float instead of dividing by zero and
# mapping NaN/inf back to 0: the results are the same wherever a' >= TINY (Z >= a' there),
# and 0 where a' == 0, but no NaN/inf is ever made, which keeps the compiled loops vectorised
# (isnan ran element by element) and off the slow path of division by zero, together
# 2-3x faster on the activations of a real step (their ReLU zeros are ~half the voxels).
TINY = torch.finfo(torch.float32).tiny


def _per_mask(t: torch.Tensor, r: torch.Tensor, n_masks: int) -> torch.Tensor:
    """t * r where t carries K masks per sample (sample-major) and r one per sample."""
    if n_masks == 1:
        return t * r
    return (t.unflatten(0, (-1, n_masks)) * r.unsqueeze(1)).flatten(0, 1)


def step_forward(pz: torch.Tensor, v: torch.Tensor, n_masks: int):
    """From [P; Z] (stacked along the channels) and V: a' = relu(P), r = a' / Z (0 where
    Z == 0: there a' == 0 too) and u' = V * r."""
    p, z = pz.chunk(2, dim=1)
    a_out = torch.relu(p)
    r = a_out / z.clamp_min(TINY)
    return a_out, r, _per_mask(v, r, n_masks)


def step_backward(g_a_out, g_u_out, u_out, a_out, r, n_masks: int):
    """[gP; -gZ] stacked along the channels, and gV (see MaskedConvStep for the algebra)."""
    g_r = g_u_out * u_out
    if n_masks > 1:
        g_r = g_r.unflatten(0, (-1, n_masks)).sum(dim=1)
    t = g_r / a_out.clamp_min(TINY)  # = gr / Z on a' > 0; 0 where a' == 0 (there u' == 0, so gr == 0)
    g_p = torch.where(a_out > 0, t + g_a_out, 0.0)
    return torch.cat([g_p, t * r], dim=1), _per_mask(g_u_out, r, n_masks)


def ratio_into_(out: torch.Tensor, a_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """r = a' / z written into ``out`` (``z`` clamped at TINY, so 0 where a' == 0).

    In place, because on CPU a fresh full-resolution tensor costs page faults that take
    longer than the division itself."""
    return torch.div(a_out, torch.clamp(z, min=TINY, out=out), out=out)


def step_forward_inplace(pz: torch.Tensor, v: torch.Tensor, n_masks: int):
    """``step_forward`` writing r into P's half of ``pz`` and u' into ``v``."""
    p, z = pz.chunk(2, dim=1)
    a_out = torch.relu(p)
    r = ratio_into_(p, a_out, z)  # P is not needed any more
    if n_masks == 1:
        return a_out, r, v.mul_(r)
    v.unflatten(0, (-1, n_masks)).mul_(r.unsqueeze(1))
    return a_out, r, v


def step_backward_inplace(g_a_out, g_u_out, u_out, a_out, r, n_masks: int):
    """``step_backward`` writing every step into one preallocated gradient buffer (fresh
    full-resolution tensors cost page faults that take longer than the arithmetic)."""
    c = a_out.shape[1]
    grads = torch.empty((a_out.shape[0], 2 * c, *a_out.shape[2:]), dtype=a_out.dtype, device=a_out.device,
                        memory_format=torch.channels_last_3d)
    g_p, g_z_neg = grads.split(c, dim=1)
    if n_masks > 1:
        g_p.copy_((g_u_out * u_out).unflatten(0, (-1, n_masks)).sum(dim=1))
    else:
        torch.mul(g_u_out, u_out, out=g_p)
    t = g_p.div_(torch.clamp(a_out, min=TINY, out=g_z_neg))
    torch.mul(t, r, out=g_z_neg)
    torch.ops.aten.threshold_backward.grad_input(t.add_(g_a_out), a_out, 0, grad_input=g_p)
    return grads, _per_mask(g_u_out, r, n_masks)


class _CompiledOnCPU:
    """``functional`` through torch.compile for CPU tensors, ``eager`` otherwise and
    after any compilation failure. Compiled on first use (importing the compiler costs
    ~1 s and ~100 MB, which processes that never train should not pay)."""

    def __init__(self, functional, eager):
        self.functional, self.eager = functional, eager
        self.enabled = not os.environ.get("GRAZBIDS_NO_COMPILE")
        self.compiled = None

    def __call__(self, *tensors_and_k):
        if self.enabled and tensors_and_k[0].device.type == "cpu":
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.functional, dynamic=True)
                return self.compiled(*tensors_and_k)
            except Exception as err:  # no compiler, unsupported platform, ...
                LOG.debug("torch.compile of %s failed (%s); using eager ops", self.functional.__name__,
                          str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
                self.enabled, self.compiled = False, None
        return self.eager(*tensors_and_k)


fused_step_forward = _CompiledOnCPU(step_forward, step_forward_inplace)
fused_step_backward = _CompiledOnCPU(step_backward, step_backward_inplace)
