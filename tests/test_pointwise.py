"""The compiled elementwise kernels of the masked z+ step equal their eager twins.

The rest of the suite runs with GRAZBIDS_NO_COMPILE=1 (conftest.py); this module
compiles the functional versions, as a user's CPU run does, and compares.
"""
import shutil

import pytest
import torch
import torch.nn.functional as F

from grazbids.engine import Architecture, build_model, masked_relevance, pointwise, zplus_conv

CL = torch.channels_last_3d


@pytest.fixture(scope="module")
def compiler_works():
    """Skip where torch.compile cannot build any CPU kernel (no C++ compiler or Python
    headers): there the engine runs its eager kernels, which the rest of the suite tests.
    Where a trivial function compiles, ours must compile too."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile needs a C++ compiler")
    try:
        torch.compile(lambda t: t * 2 + 1, dynamic=True)(torch.ones(3, 5))
    except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure
        pytest.skip(f"torch.compile does not work here: {str(err).splitlines()[0][:200]}")


@pytest.fixture()
def compiled(monkeypatch, compiler_works):
    """Fresh compiled wrappers (the module-level ones were built with compilation off)."""
    monkeypatch.delenv("GRAZBIDS_NO_COMPILE", raising=False)
    fwd = pointwise._CompiledOnCPU(pointwise.step_forward, pointwise.step_forward_inplace)
    bwd = pointwise._CompiledOnCPU(pointwise.step_backward, pointwise.step_backward_inplace)
    monkeypatch.setattr(zplus_conv, "fused_step_forward", fwd)
    monkeypatch.setattr(zplus_conv, "fused_step_backward", bwd)
    return fwd, bwd


def _activations(n=2, c=8, k=1, shape=(5, 6, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    z = rand(n, c, *shape).abs() * (rand(n, c, *shape) > -0.5)  # exact zeros, as where no input fires
    p = torch.minimum(rand(n, c, *shape), z)  # P <= Z (biases <= 0), negative where the unit is off
    pz = torch.cat([p, z], dim=1).contiguous(memory_format=CL)
    v = (z.repeat_interleave(k, dim=0) * torch.rand(n * k, c, *shape, generator=g, dtype=dtype))
    return pz, v.contiguous(memory_format=CL)


@pytest.mark.parametrize("n_masks", [1, 3])
def test_compiled_step_equals_eager(compiled, n_masks):
    fwd, bwd = compiled
    pz, v = _activations(k=n_masks)
    a_c, r_c, u_c = fwd(pz, v, n_masks)
    a_e, r_e, u_e = pointwise.step_forward_inplace(pz.clone(), v.clone(), n_masks)
    assert fwd.enabled and fwd.compiled is not None, "compilation failed: the eager path ran"
    for got, want in [(a_c, a_e), (r_c, r_e), (u_c, u_e)]:
        assert torch.equal(got, want)
    assert (r_e == 0).any() and (r_e > 0).any()

    g = torch.Generator().manual_seed(1)
    g_a = torch.randn(a_e.shape, generator=g).contiguous(memory_format=CL)
    g_u = torch.randn(u_e.shape, generator=g).contiguous(memory_format=CL)
    grads_c, g_v_c = bwd(g_a, g_u, u_e, a_e, r_e, n_masks)
    grads_e, g_v_e = pointwise.step_backward_inplace(g_a, g_u, u_e, a_e, r_e, n_masks)
    assert bwd.enabled and bwd.compiled is not None
    assert torch.equal(g_v_c, g_v_e)
    # the K masks' sum may be reduced in another order by the compiler
    torch.testing.assert_close(grads_c, grads_e, rtol=1e-6, atol=1e-6)
    if n_masks == 1:
        assert torch.equal(grads_c, grads_e)


def test_compiled_graz_gradients_equal_eager(compiled):
    """The whole masked sweep, weight gradients included, on a small network."""
    torch.manual_seed(0)
    model = build_model(Architecture((12, 14, 10), channels=8, n_blocks=2, dense_units=4))
    x = torch.rand(2, 1, 12, 14, 10)
    mask = (torch.rand_like(x) > 0.4).float()
    y = torch.tensor([0, 1])

    def gradients(step_fwd, step_bwd):
        zplus_conv.fused_step_forward, zplus_conv.fused_step_backward = step_fwd, step_bwd
        model.zero_grad()
        logits, inside, _ = masked_relevance(model, x, mask)
        (F.cross_entropy(logits, y) - inside.mean()).backward()
        return logits.detach(), inside.detach(), [p.grad.clone() for p in model.parameters()]

    fwd, bwd = compiled
    got = gradients(fwd, bwd)
    want = gradients(pointwise.step_forward_inplace, pointwise.step_backward_inplace)
    assert fwd.enabled and bwd.enabled and fwd.compiled is not None
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g_c, g_e in zip(got[2], want[2]):
        assert torch.equal(g_c, g_e)
