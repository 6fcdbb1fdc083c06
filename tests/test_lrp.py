"""z+ LRP: conservation, parity with a brute-force computation, gradients."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grazbids.engine import masked_relevance, start_relevance, zplus_heatmap
from engine_helpers import tiny_model


def _dense_matrix(layer, in_shape):
    """The layer's linear map (no bias) as an explicit matrix, built from basis vectors."""
    n_in = int(np.prod(in_shape))
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape)
    with torch.no_grad():
        if isinstance(layer, torch.nn.Conv3d):
            out = F.conv3d(basis, layer.weight, None, layer.stride, layer.padding)
        else:
            out = basis @ layer.weight.T
    return out.reshape(n_in, -1).T.numpy(), tuple(out.shape[1:])


def brute_force_zplus(model, x, start):
    """Explicit per-layer z+ redistribution in float64 with dense matrices and numpy."""
    layers = model.lrp_layers()
    a = x.numpy().ravel()
    shape = tuple(x.shape)
    activations, matrices = [], []
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Linear):
            shape = (int(np.prod(shape)),)
        W, out_shape = _dense_matrix(layer, shape)
        bias = layer.bias.detach().numpy()
        b = np.repeat(bias, W.shape[0] // len(bias))  # one bias per output channel
        activations.append(a)
        matrices.append(W)
        pre = W @ a + b
        a = np.maximum(pre, 0) if i < len(layers) - 1 else pre
        shape = out_shape
    logits = a
    R = start(logits)
    for a, W in zip(reversed(activations), reversed(matrices)):
        Wp = np.maximum(W, 0)
        contributions = Wp * a[None, :]  # z_ji = a_i * w+_ji
        z = contributions.sum(axis=1)
        share = np.divide(contributions, z[:, None], out=np.zeros_like(contributions), where=z[:, None] != 0)
        R = share.T @ R
    return R.reshape(x.shape), logits


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


@pytest.mark.parametrize("target", ["softmax", "predicted", 1])
def test_matches_brute_force(target):
    model = tiny_model()
    x = torch.rand(1, 1, 8, 7, 6, dtype=torch.float64)

    def start(logits):
        p = _softmax(logits)
        if target == "softmax":
            return p
        k = int(np.argmax(p)) if target == "predicted" else target
        return np.eye(len(p))[k] * p

    expected, logits = brute_force_zplus(model, x[0], start)
    R, torch_logits = zplus_heatmap(model, x, target)
    np.testing.assert_allclose(torch_logits[0].detach().numpy(), logits, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(R[0].detach().numpy(), expected, rtol=1e-9, atol=1e-14)


def test_conservation_every_sample():
    model = tiny_model(shape=(12, 10, 9), n_blocks=2)
    x = torch.rand(4, 1, 12, 10, 9, dtype=torch.float64)
    for target in ("softmax", "predicted", 2):
        R, logits = zplus_heatmap(model, x, target)
        start = start_relevance(logits, target).sum(1)
        torch.testing.assert_close(R.sum(dim=(1, 2, 3, 4)), start, rtol=1e-4, atol=0)
        assert (R >= 0).all(), "z+ maps of non-negative inputs are non-negative"


def test_conservation_float32_graz_size():
    model = tiny_model(shape=(24, 28, 24), n_blocks=4, channels=8, n_classes=2, dtype=torch.float32)
    x = torch.rand(2, 1, 24, 28, 24)
    with torch.inference_mode():
        R, logits = zplus_heatmap(model, x)
    torch.testing.assert_close(R.sum(dim=(1, 2, 3, 4)), torch.ones(2), rtol=1e-4, atol=0)


def test_zero_background_keeps_map_finite():
    model = tiny_model()
    x = torch.zeros(1, 1, 8, 7, 6, dtype=torch.float64)
    x[..., 2:5, 2:5, 2:4] = 1.0
    R, _ = zplus_heatmap(model, x)
    assert torch.isfinite(R).all()
    assert (R[x == 0] == 0).all(), "relevance only lands on non-zero inputs"


class _HeatmapOf(torch.nn.Module):
    """Wraps a network so torch.func.functional_call can swap weights under the map."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return zplus_heatmap(self.net, x)[0]


def test_gradcheck_through_map():
    wrapper = _HeatmapOf(tiny_model(shape=(5, 4, 4), n_classes=2, n_blocks=1, channels=2))
    x = (torch.rand(1, 1, 5, 4, 4, dtype=torch.float64) + 0.1).requires_grad_()
    mask = (torch.rand_like(x) > 0.5).double()
    params = {name: p.detach() for name, p in wrapper.named_parameters()}

    def masked_sum(inp, name, value):
        return (torch.func.functional_call(wrapper, {**params, name: value}, (inp,)) * mask).sum()

    assert torch.autograd.gradcheck(lambda inp: (wrapper(inp) * mask).sum(), (x,))
    for name in ("net.convs.0.weight", "net.convs.1.weight", "net.dense.0.weight", "net.dense.1.bias"):
        value = params[name].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda v: masked_sum(x.detach(), name, v), (value,)), name


def test_masked_relevance_equals_map_and_its_gradient():
    model = tiny_model(shape=(12, 10, 9), n_blocks=2)
    x = torch.rand(3, 1, 12, 10, 9, dtype=torch.float64)
    mask = (torch.rand_like(x) > 0.4).double()
    R, logits = zplus_heatmap(model, x)
    by_map = (R * mask).sum(dim=(1, 2, 3, 4))
    logits2, inside, total = masked_relevance(model, x, mask)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(inside, by_map, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, R.sum(dim=(1, 2, 3, 4)), rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    g_map = torch.autograd.grad(by_map.sum(), params)
    g_fwd = torch.autograd.grad(inside.sum(), params)
    for a, b in zip(g_map, g_fwd):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="unknown LRP target"):
        start_relevance(torch.zeros(1, 2), "nonsense")
    with pytest.raises(ValueError, match="out of range"):
        start_relevance(torch.zeros(1, 2), 5)


def test_masked_relevance_with_two_masks_equals_two_sweeps():
    """Brain + guidance mask in one sweep: same sums and gradients as one sweep per mask."""
    model = tiny_model()
    x = torch.rand(3, 1, 8, 7, 6, dtype=torch.float64)
    masks = (torch.rand(3, 2, 8, 7, 6, dtype=torch.float64) > 0.5).to(torch.float64)
    logits, both, total = masked_relevance(model, x, masks)
    assert both.shape == (3, 2)
    grads_both = torch.autograd.grad(both.sum(), list(model.parameters()))
    singles, grads_single = [], None
    for k in range(2):
        _, inside, total_k = masked_relevance(model, x, masks[:, k:k + 1])
        singles.append(inside)
        torch.testing.assert_close(total_k, total)
        g = torch.autograd.grad(inside.sum(), list(model.parameters()))
        grads_single = g if grads_single is None else [a + b for a, b in zip(grads_single, g)]
    torch.testing.assert_close(both, torch.stack(singles, dim=1))
    for a, b in zip(grads_both, grads_single):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("target", [0, 2])
def test_contrastive_map_matches_brute_force(target):
    """explain(..., "contrastive"): z+ of p_c e_c minus z+ of the other classes' probabilities."""
    from grazbids.explain import explain

    model = tiny_model()
    x = torch.rand(1, 1, 8, 7, 6, dtype=torch.float64)

    def start(logits):  # the class against its dual, in one signed start vector
        p = _softmax(logits)
        own = np.eye(len(p))[target] * p
        return own - (p - own)

    expected, logits = brute_force_zplus(model, x[0], start)
    R = explain(model, x, "contrastive", target=target)
    np.testing.assert_allclose(R[0].numpy(), expected, rtol=1e-8, atol=1e-13)
    p = _softmax(logits)
    assert np.isclose(R.sum().item(), 2 * p[target] - 1, rtol=1e-6)  # conserves the signed start
    with pytest.raises(ValueError, match="one class against the others"):
        explain(model, x, "contrastive", target="softmax")
