"""Architecture, bias projection, the three training modes, normalisation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grazbids.engine import Architecture, IntensityNormalisation, build_model, compute_loss, zplus_heatmap
from engine_helpers import tiny_model


def test_graz_architecture_shapes():
    model = build_model(Architecture((97, 115, 97)))
    assert len(model.convs) == 8 and [c.stride[0] for c in model.convs] == [1, 2] * 4
    assert model.feature_shape == (8, 7, 8, 7)
    assert model.dense[0].out_features == 16 and model.dense[1].out_features == 2
    assert model(torch.rand(1, 1, 97, 115, 97)).shape == (1, 2)


def test_architecture_round_trip_and_checks():
    arch = Architecture((20, 22, 18), n_classes=3, channels=4, n_blocks=3)
    assert Architecture.from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError):
        build_model(Architecture((20, 22), n_classes=2))
    with pytest.raises(ValueError):
        build_model(Architecture((8, 8, 8), n_classes=1))


def test_bias_projection_after_optimiser_step():
    model = tiny_model(dtype=torch.float32)
    optimiser = torch.optim.SGD(model.parameters(), lr=10.0)
    for layer in model.lrp_layers():
        layer.bias.grad = -torch.ones_like(layer.bias)  # pushes every bias upwards
        layer.weight.grad = torch.zeros_like(layer.weight)
    optimiser.step()
    assert any((layer.bias > 0).any() for layer in model.lrp_layers())
    model.project_biases_()
    for layer in model.lrp_layers():
        assert (layer.bias <= 0).all()
    # projection keeps already-feasible biases untouched
    before = [layer.bias.clone() for layer in model.lrp_layers()]
    model.project_biases_()
    for b, layer in zip(before, model.lrp_layers()):
        assert torch.equal(b, layer.bias)


def _batch():
    model = tiny_model(n_classes=2)
    x = torch.rand(4, 1, 8, 7, 6, dtype=torch.float64)
    mask = (torch.rand_like(x) > 0.5).double()
    y = torch.tensor([0, 1, 1, 0])
    w = torch.tensor([2.0, 0.5, 0.5, 2.0], dtype=torch.float64)
    return model, x, mask, y, w


def test_plain_mode_is_weighted_cross_entropy():
    model, x, mask, y, w = _batch()
    out = compute_loss(model, x, mask, y, w, "plain")
    expected = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
    torch.testing.assert_close(out.loss, expected)


def test_masked_mode_sees_only_the_masked_image():
    model, x, mask, y, w = _batch()
    out = compute_loss(model, x, mask, y, w, "masked")
    expected = (w * F.cross_entropy(model(x * mask), y, reduction="none")).mean()
    torch.testing.assert_close(out.loss, expected)
    changed_outside = x + (1 - mask) * 5.0
    torch.testing.assert_close(compute_loss(model, changed_outside, mask, y, w, "masked").loss, out.loss)


def test_grazplus_mode_adds_minus_relevance_inside_mask():
    model, x, mask, y, w = _batch()
    lam = 0.7
    out = compute_loss(model, x, mask, y, w, "grazplus", relevance_weight=lam)
    R, logits = zplus_heatmap(model, x)
    inside = (mask * R).sum(dim=(1, 2, 3, 4))
    expected = (w * (F.cross_entropy(logits, y, reduction="none") - lam * inside)).mean()
    torch.testing.assert_close(out.loss, expected)
    # the gradient flows through the heat map
    g_loss = torch.autograd.grad(out.loss, model.dense[0].weight)[0]
    g_expected = torch.autograd.grad(expected, model.dense[0].weight)[0]
    torch.testing.assert_close(g_loss, g_expected)


def test_unknown_mode():
    model, x, mask, y, w = _batch()
    with pytest.raises(ValueError, match="unknown training mode"):
        compute_loss(model, x, mask, y, w, "gradcam")


def test_normalisation_is_scale_invariant_and_non_negative():
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, size=(10, 10, 10)).astype(np.float32)
    image[0] = -5.0  # interpolation ringing
    mask = np.zeros_like(image)
    mask[2:8, 2:8, 2:8] = 1
    norm = IntensityNormalisation()
    a = norm.apply(image, mask)
    b = norm.apply(image * 37.5, mask)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a.min() >= 0 and a.max() <= norm.clip_max
    assert abs(np.percentile(a[(mask > 0) & (a > 0)], 99) - 1.0) < 0.02
    assert IntensityNormalisation.from_dict(norm.to_dict()) == norm
    with pytest.raises(ValueError, match="no positive voxel"):
        norm.apply(np.zeros((4, 4, 4)), np.ones((4, 4, 4)))


def test_ratio_guidance_loss_matches_its_definition():
    """CE / M^p, M = sum(G R) / sum(B R) from the explicit z+ map; empty guidance -> CE."""
    model = tiny_model(n_classes=2)
    x = torch.rand(3, 1, 8, 7, 6, dtype=torch.float64)
    brain = torch.zeros_like(x)
    brain[:, :, 1:7, 1:6, 1:5] = 1
    guidance = torch.zeros_like(x)
    guidance[:2, :, 3:5, 2:4, 2:4] = 1  # the third sample has no lesion
    y, w = torch.tensor([0, 1, 1]), torch.ones(3, dtype=torch.float64)
    out = compute_loss(model, x, torch.cat([brain, guidance], 1), y, w, "grazplus",
                       guidance_loss="ratio", guidance_power=2.0)
    relevance, logits = zplus_heatmap(model, x)
    share = (relevance * guidance).sum((1, 2, 3, 4)) / (relevance * brain).sum((1, 2, 3, 4))
    ce = F.cross_entropy(logits, y, reduction="none")
    expected = torch.stack([ce[0] / share[0] ** 2, ce[1] / share[1] ** 2, ce[2]]).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.relevance_inside, (relevance * guidance).sum((1, 2, 3, 4)))
    # additive with a guidance mask: CE - sum(G R)
    additive = compute_loss(model, x, torch.cat([brain, guidance], 1), y, w, "grazplus")
    torch.testing.assert_close(additive.loss, (ce - (relevance * guidance).sum((1, 2, 3, 4))).mean())
    with pytest.raises(ValueError, match="unknown guidance loss"):
        compute_loss(model, x, brain, y, w, "grazplus", guidance_loss="product")
