"""grazbids.explain: LRP rules against a brute-force computation, conservation, known-answer
maps, integrated-gradients completeness, the randomisation sanity check, errors."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from grazbids.engine import Architecture, build_model, start_relevance, zplus_heatmap
from grazbids.explain import METHODS, UnsupportedModelError, describe, explain, layer_chain
from grazbids.explain.gradients import baseline_for
from grazbids.explain.graph import _affine
from grazbids.explain.lrp_rules import alphabeta
from engine_helpers import tiny_model
from explain_helpers import brute_force_lrp, ops_of, pooled_sequential, softmax, tiny_kondrateva, unrolled

LRP_RULES = {  # method -> (params, rule_of(is_conv, is_first) for the brute force)
    "zplus": ({}, lambda conv, first: ("zplus", {})),
    "epsilon": ({"eps": 0.05}, lambda conv, first: ("epsilon", {"eps": 0.05})),
    "alpha1beta0": ({}, lambda conv, first: ("alphabeta", {"alpha": 1.0, "beta": 0.0})),
    "alpha2beta1": ({}, lambda conv, first: ("alphabeta", {"alpha": 2.0, "beta": 1.0})),
    "alphabeta": ({"alpha": 3.0, "beta": 2.0}, lambda conv, first: ("alphabeta", {"alpha": 3.0, "beta": 2.0})),
}
MODELS = {
    "grazplus": lambda: tiny_model(shape=(8, 7, 6)),
    "kondrateva": lambda: tiny_kondrateva(),
    "pooled": lambda: pooled_sequential(),
}
SHAPES = {"grazplus": (1, 8, 7, 6), "kondrateva": (1, 8, 8, 8), "pooled": (1, 8, 8, 8)}


def _composite_rule(x, first_rule):
    def rule_of(conv, first):
        if first:
            if first_rule == "flat":
                return "flat", {}
            return "zbeta", {"low": float(x.min()), "high": float(x.max())}
        return ("alphabeta", {"alpha": 2.0, "beta": 1.0}) if conv else ("epsilon", {"eps": 0.01})
    return rule_of


def _inputs(model_name, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    # signed inputs for the generic models, so the alpha-beta sign split is exercised
    x = torch.rand(n, *SHAPES[model_name], generator=g, dtype=torch.float64)
    return x if model_name == "grazplus" else x - 0.3


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", [*LRP_RULES, "composite-zbeta", "composite-flat"])
def test_lrp_rules_match_brute_force(model_name, method):
    model = MODELS[model_name]()
    x = _inputs(model_name)
    ops = ops_of(model, x.shape[1:])
    compared = 0.0
    for target in ("predicted", 1, "softmax"):
        if method.startswith("composite"):
            first_rule = method.split("-")[1]
            maps = explain(model, x, "composite", target=target, first_rule=first_rule)
        else:
            params, rule_of = LRP_RULES[method]
            maps = explain(model, x, method, target=target, **params)
        assert maps.shape == x.shape
        for n in range(x.shape[0]):
            rule_of = _composite_rule(x[n], first_rule) if method.startswith("composite") else LRP_RULES[method][1]

            def start(logits):
                p = softmax(logits)
                if target == "softmax":
                    return p
                k = int(np.argmax(p)) if target == "predicted" else target
                return np.eye(len(p))[k] * p

            expected, logits = brute_force_lrp(model, x[n], rule_of, start, ops)
            np.testing.assert_allclose(model(x[n:n + 1])[0].detach().numpy(), logits, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(maps[n].numpy(), expected, rtol=1e-8, atol=1e-12)
            compared += np.abs(expected).sum()
    assert compared > 1e-3, "the comparison must not be trivially zero"


def test_zplus_equals_the_engine_heat_map():
    model = tiny_model(shape=(12, 10, 9), n_blocks=2)
    x = torch.rand(3, 1, 12, 10, 9, dtype=torch.float64)
    for target in ("softmax", "predicted", 2):
        expected, _ = zplus_heatmap(model, x, target)
        torch.testing.assert_close(explain(model, x, "zplus", target=target), expected.detach(), rtol=1e-10, atol=1e-14)
    model32 = tiny_model(shape=(24, 28, 24), n_blocks=4, channels=8, n_classes=2, dtype=torch.float32)
    x32 = torch.rand(1, 1, 24, 28, 24)
    with torch.inference_mode():
        expected, _ = zplus_heatmap(model32, x32)
    torch.testing.assert_close(explain(model32, x32, "zplus", target="softmax"), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method,params,rtol", [
    ("zplus", {}, 1e-10), ("alpha1beta0", {}, 1e-10),
    ("epsilon", {"eps": 1e-9}, 1e-6), ("composite", {"epsilon": 1e-9}, 1e-6),
    ("composite", {"epsilon": 1e-9, "first_rule": "flat"}, 1e-6),
])
def test_conservation_with_zero_biases(method, params, rtol):
    # wide enough dense layers that every class has some positive evidence (else z+ loses it)
    models = [tiny_kondrateva(zero_biases=True, dense_units=32), tiny_model(shape=(8, 8, 8))]
    with torch.no_grad():
        for layer in models[1].lrp_layers():
            layer.bias.zero_()
    x = torch.rand(3, 1, 8, 8, 8, dtype=torch.float64) + 0.05
    for model in models:
        for target in ("softmax", "predicted"):
            R = explain(model, x, method, target=target, **params)
            start = start_relevance(model(x), target).sum(dim=1).detach()
            torch.testing.assert_close(R.sum(dim=(1, 2, 3, 4)), start, rtol=rtol, atol=0)


def test_alpha_beta_layer_conserves_where_both_parts_are_nonzero():
    """alpha - beta = 1 conserves per output j when z+_j and z-_j are both non-zero (an output
    with only positive contributions passes alpha R_j instead: the rule's known leak, which
    is why the model-level conservation test above covers only alpha1beta0)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, 3, stride=2, padding=1, bias=False).double()
    layer = _affine("conv", conv, None)
    a = torch.randn(2, 3, 6, 6, 6, dtype=torch.float64)  # signed: both sign splits matter
    R = torch.rand(2, 4, 3, 3, 3, dtype=torch.float64)
    W = unrolled(conv, (3, 6, 6, 6))[0]
    for n in range(2):
        products = W * a[n].numpy().ravel()[None, :]
        assert ((products > 0).any(axis=1) & (products < 0).any(axis=1)).all(), "precondition"
    for alpha, beta in ((2.0, 1.0), (3.0, 2.0), (1.0, 0.0)):
        R_in = alphabeta(layer, a, R, alpha, beta)
        torch.testing.assert_close(R_in.sum(dim=(1, 2, 3, 4)), R.sum(dim=(1, 2, 3, 4)), rtol=1e-10, atol=0)


def test_alpha1beta0_equals_zplus_for_positive_inputs_and_zero_biases():
    model = tiny_model(shape=(8, 8, 8))
    with torch.no_grad():
        for layer in model.lrp_layers():
            layer.bias.zero_()
    x = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(explain(model, x, "alpha1beta0"), explain(model, x, "zplus"), rtol=1e-10, atol=1e-14)


# ---- known answer: the logit depends on one corner region only ----------------------------

REGION = (slice(None), slice(None), slice(0, 7), slice(0, 7), slice(0, 7))  # receptive field


def region_model():
    """Class 1's logit reads only the (0, 0, 0) position of the last feature maps, whose
    receptive field is the corner [0, 7)^3 of the 16^3 input; class 0's logit is 0."""
    torch.manual_seed(0)
    arch = Architecture((16, 16, 16), n_classes=2, channels=4, n_blocks=2, dense_units=0, name="kondrateva")
    model = build_model(arch).double().eval()
    with torch.no_grad():
        for conv in (model.features[0], model.features[4]):
            conv.weight.abs_()  # features grow with intensity
            conv.bias.fill_(-0.05)
        head = model.classifier[-1]
        head.weight.zero_()
        head.bias.zero_()
        head.weight.view(2, 8, 4, 4, 4)[1, :, 0, 0, 0] = 0.25
        head.bias[1] = -4.0  # p(class 1) ~ 0.9: not saturated, so perturbations can lower it
    return model


def region_input(distractor=True):
    g = torch.Generator().manual_seed(0)
    x = 0.2 * torch.rand(1, 1, 16, 16, 16, generator=g, dtype=torch.float64)
    x[..., 2:5, 2:5, 2:5] += 0.5  # a bright blob inside the region
    if distractor:
        x[..., 9:12, 9:12, 9:12] += 0.5  # the same blob outside it, which the logit ignores
    return x


def _inside_fraction(m):
    inside = torch.zeros_like(m, dtype=torch.bool)
    inside[REGION] = True
    a = m.abs()
    return float(a[inside].sum() / a.sum()), bool(inside.flatten()[a.flatten().argmax()])


FAST_MP = {"iterations": 60, "mask_downsample": 2, "blur_sigma": 2.0}


@pytest.mark.parametrize("method", ["gradient", "gradient_x_input", "integrated_gradients", "guided_backprop",
                                    "zplus", "epsilon", "alpha2beta1", "composite"])
def test_known_region_gets_all_attribution(method):
    model, x = region_model(), region_input()
    assert torch.softmax(model(x), 1)[0, 1] > 0.8
    fraction, argmax_inside = _inside_fraction(explain(model, x, method, target=1))
    assert fraction > 0.999 and argmax_inside


def test_known_region_meaningful_perturbation():
    model, x = region_model(), region_input()
    saliency = explain(model, x, "meaningful_perturbation", target=1, **FAST_MP)
    fraction, argmax_inside = _inside_fraction(saliency)
    assert argmax_inside and fraction > 0.7
    assert saliency.max() > 0.3, "something was deleted"
    # seeded: deterministic
    short = {**FAST_MP, "iterations": 5}
    assert torch.equal(*(explain(model, x, "meaningful_perturbation", target=1, **short) for _ in range(2)))


def test_known_region_grad_cam_is_coarse():
    """Grad-CAM weighs whole channels, so it can only localise where activations differ: with
    the blob in the region only, the map peaks there and is higher there on average."""
    model, x = region_model(), region_input(distractor=False)
    cam = explain(model, x, "gradcam", target=1)
    _, argmax_inside = _inside_fraction(cam)
    inside = torch.zeros_like(cam, dtype=torch.bool)
    inside[REGION] = True
    assert argmax_inside and cam.max() == 1.0
    assert cam[inside].mean() > 1.5 * cam[~inside].mean()
    coarse = explain(model, x, "gradcam", target=1, layer="features.0", normalise=False)
    assert coarse.shape == x.shape and coarse.max() > 0


def _pearson(a, b):
    """Pearson correlation; 0 when a map is constant (nothing in common with any other)."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    norms = a.norm() * b.norm()
    return float((a * b).sum() / norms) if norms > 0 else 0.0


def test_maps_change_when_weights_are_randomised():
    """Adebayo et al.'s model-randomisation check: the same model gives the same map, a
    model with re-drawn weights (same architecture) a clearly different one."""
    model, x = region_model(), region_input()
    torch.manual_seed(123)
    random_model = build_model(model.arch).double().eval()
    for method in METHODS:
        params = {**FAST_MP, "iterations": 20} if method == "meaningful_perturbation" else {}
        original = explain(model, x, method, target=1, **params)
        assert _pearson(original.abs(), explain(model, x, method, target=1, **params).abs()) > 0.999999
        randomised = explain(random_model, x, method, target=1, **params)
        assert _pearson(original.abs(), randomised.abs()) < 0.6, method


@pytest.mark.parametrize("model_name", ["grazplus", "kondrateva"])
@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_integrated_gradients_completeness(model_name, baseline):
    """Sum of attributions = f(x) - f(x0), up to the midpoint rule's error at ReLU kinks."""
    model = MODELS[model_name]()
    x = torch.rand(2, *SHAPES[model_name], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    attributions = explain(model, x, "integrated_gradients", target=1, baseline=baseline, sigma=3.0, steps=512)
    reference = baseline_for(x, baseline, 3.0)
    with torch.no_grad():
        fx, f0 = model(x)[:, 1], model(reference)[:, 1]
    assert (fx - f0).abs().max() > 2e-3
    error = (attributions.sum(dim=(1, 2, 3, 4)) - (fx - f0)).abs()
    assert (error <= 5e-3 * (fx - f0).abs() + 1e-3 * (fx.abs() + f0.abs())).all(), error


def test_gradient_x_input_is_input_times_gradient_and_target_choice():
    model = tiny_kondrateva()
    x = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    g = explain(model, x, "gradient", target=2)
    torch.testing.assert_close(explain(model, x, "gradient_x_input", target=2), x * g)
    leaf = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(leaf)[:, 2].sum(), leaf)
    torch.testing.assert_close(g, expected)
    predicted = model(x).argmax(1)
    per_sample = torch.stack([explain(model, x[i:i + 1], "gradient", target=int(predicted[i]))[0] for i in range(2)])
    torch.testing.assert_close(explain(model, x, "gradient"), per_sample)


def test_guided_backprop_differs_from_gradient_and_covers_functional_relu():
    for model in (tiny_model(shape=(8, 8, 8)), tiny_kondrateva()):  # torch.relu and nn.ReLU
        x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64)
        guided = explain(model, x, "guided_backprop", target=0)
        plain = explain(model, x, "gradient", target=0)
        assert not torch.allclose(guided, plain)
        assert guided.abs().sum() > 0


def test_caller_model_is_left_unchanged():
    model = tiny_kondrateva()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64)
    for method in METHODS:
        params = {"iterations": 3} if method == "meaningful_perturbation" else {}
        explain(model, x, method, **params)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_works_inside_inference_mode_and_with_frozen_weights():
    model = tiny_kondrateva()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64)
    methods = ("gradient", "gradcam", "guided_backprop", "zplus", "composite")
    expected = {method: explain(model, x, method) for method in methods}
    with torch.inference_mode():
        x_inference = x.clone()
        for method in methods:
            assert torch.equal(explain(model, x_inference, method), expected[method]), method
    assert expected["gradient"].abs().sum() > 0 and expected["gradcam"].max() == 1


# ---- the layer graph and errors -------------------------------------------------------------

class _FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 4 * 4 * 4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_functional_flatten_is_recognised():
    class FlattenInForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(2 * 4 * 4 * 4, 2)

        def forward(self, x):
            return self.head(self.features(x).view(x.shape[0], -1))

    model = FlattenInForward().double()
    x = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)
    assert [type(s).__name__ for s in layer_chain(model, x)] == ["Affine", "PassThrough", "Flatten", "Affine"]
    R = explain(model, x, "zplus", target="softmax")
    assert R.shape == x.shape


@pytest.mark.parametrize("model,message", [
    (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(128, 2)), r"module '1' \(GELU\)"),
    (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(128, 2)),
     r"module '2' \(BatchNorm3d\) does not directly follow"),
    (_FunctionalRelu(), r"module 'head' \(Linear\) is not fed the output of module 'conv'"),
    (nn.Sequential(nn.Conv3d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(128, 2)), "padding_mode"),
])
def test_unsupported_models_name_the_module(model, message):
    x = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(UnsupportedModelError, match=message):
        explain(model, x, "epsilon")
    # the gradient-based methods still work on them
    assert explain(model, x, "gradient").shape == x.shape


def test_bad_arguments():
    model = tiny_kondrateva()
    x = torch.rand(1, 1, 8, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown explanation method 'lime'"):
        explain(model, x, "lime")
    with pytest.raises(ValueError, match="has no parameter.*steps.*parameters: eps"):
        explain(model, x, "epsilon", steps=3)
    with pytest.raises(ValueError, match="only defined for the LRP"):
        explain(model, x, "gradient", target="softmax")
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, "gradient", target=7)
    with pytest.raises(ValueError, match="no layer named 'nope'.*features.0"):
        explain(model, x, "gradcam", layer="nope")
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        explain(model, x[0], "gradient")
    with pytest.raises(ValueError, match="do not contain"):
        explain(model, x, "composite", low=0.5)


def test_describe_is_json_ready_with_defaults_filled_in():
    for name in METHODS:
        d = describe(name, target="predicted")
        assert d["method"] == name and d["parameters"] == METHODS[name].defaults
        json.dumps(d)
    d = describe("composite", {"first_rule": "flat"}, target=1)
    assert d["parameters"]["first_rule"] == "flat" and d["parameters"]["alpha"] == 2.0 and d["target"] == 1
