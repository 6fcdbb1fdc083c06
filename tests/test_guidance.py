"""Outside-the-brain penalties of the Graz+ loss against brute force (float64)."""
import pytest
import torch
import torch.nn.functional as F

from grazbids.engine import Architecture, Trainer, TrainingData, TrainSettings, build_model, compute_loss
from grazbids.engine.guidance import (
    contrastive_start, epsilon_relevance, gradient_penalty, invariance_penalty, outside_penalty, signed_penalty,
)
from grazbids.explain import lrp_rules
from grazbids.explain.graph import Affine, Flatten, layer_chain

SHAPE = (8, 8, 8)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = build_model(Architecture(SHAPE, n_classes=2, n_blocks=1, channels=2, dense_units=4)).double()
    for p in model.parameters():  # biases <= 0 as training keeps them; weights varied
        p.data = torch.randn_like(p) * 0.5 - (0.1 if p.dim() == 1 else 0.0)
    x = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    brain = torch.zeros_like(x)
    brain[..., 2:6, 2:6, 2:6] = 1
    return model, x, brain


def test_invariance_penalty_is_the_jeffreys_divergence_of_the_two_outputs():
    model, x, brain = _setup()
    outside = 1 - brain
    penalty = invariance_penalty(model, x, outside, model(x))
    for i in range(2):  # brute force, one sample at a time, from the definition
        p = F.softmax(model(x[i:i + 1]), 1)[0]
        q = F.softmax(model(x[i:i + 1] * brain[i:i + 1]), 1)[0]
        assert torch.isclose(penalty[i], ((p - q) * (p.log() - q.log())).sum(), rtol=1e-10)
    assert torch.allclose(invariance_penalty(model, x * brain, outside, model(x * brain)), torch.zeros(2, dtype=x.dtype))


def test_gradient_penalty_matches_finite_differences():
    model, x, brain = _setup(1)
    outside = 1 - brain
    xg = x.clone().requires_grad_(True)
    penalty = gradient_penalty(xg, outside, model(xg))

    def f(z):  # sum_k log p_k of sample 0
        with torch.no_grad():
            return float(F.log_softmax(model(z), 1).sum())

    base, eps = x[:1].clone(), 1e-6
    grad = torch.zeros_like(base)
    for idx in torch.nonzero(outside[0, 0]).tolist():  # every outside voxel, by central differences
        up, down = base.clone(), base.clone()
        up[0, 0][tuple(idx)] += eps
        down[0, 0][tuple(idx)] -= eps
        grad[0, 0][tuple(idx)] = (f(up) - f(down)) / (2 * eps)
    assert torch.isclose(penalty[0], grad.pow(2).sum(), rtol=1e-5)


def test_signed_relevance_matches_the_epsilon_rule_layer_by_layer():
    """The engine's signed map against the explain module's epsilon rule (an independent
    implementation, itself tested against brute force) run over the layer chain."""
    model, x, _ = _setup(4)
    y = torch.tensor([1, 0])
    got, logits = epsilon_relevance(model, x, y, eps=0.01)
    chain = layer_chain(model, x)
    inputs, a = [], x
    for step in chain:
        inputs.append(a)
        a = step.forward(a)
    assert torch.allclose(a, logits, rtol=1e-12)
    relevance = contrastive_start(a, y)
    for step, a_in in zip(reversed(chain), reversed(inputs)):
        if isinstance(step, Affine):
            relevance = lrp_rules.epsilon(step, a_in, relevance, eps=0.01)
        elif isinstance(step, Flatten):
            relevance = relevance.reshape(a_in.shape)
    assert torch.allclose(got, relevance, rtol=1e-10, atol=1e-14)
    # signed: negative evidence is kept (z+ maps are never negative)
    assert (got < 0).any() and (got > 0).any()
    # the start is the contrastive logit difference
    start = contrastive_start(logits, y)
    assert torch.allclose(start.sum(1), logits.gather(1, y[:, None])[:, 0] - logits.gather(1, 1 - y[:, None])[:, 0])


def test_signed_penalty_is_the_outside_share_of_absolute_relevance():
    model, x, brain = _setup(5)
    y = torch.tensor([0, 1])
    relevance, _ = epsilon_relevance(model, x, y)
    penalty = signed_penalty(model, x, 1 - brain, y)
    for i in range(2):
        r = relevance[i].abs()
        assert torch.isclose(penalty[i], r[brain[i] == 0].sum() / r.sum(), rtol=1e-12)
    assert ((penalty > 0) & (penalty < 1)).all()
    # nothing outside: no penalty; everything outside: 1
    assert torch.allclose(signed_penalty(model, x, torch.zeros_like(x), y), torch.zeros(2, dtype=x.dtype))
    assert torch.allclose(signed_penalty(model, x, torch.ones_like(x), y), torch.ones(2, dtype=x.dtype))


def _penalty(kind, model, x, brain, y=torch.tensor([0, 1])):
    xi = x.clone().requires_grad_(kind == "gradient")
    return outside_penalty(kind, model, xi, 1 - brain, model(xi), y)


@pytest.mark.parametrize("kind", ["invariance", "gradient", "signed"])
def test_penalties_are_differentiable_in_the_weights(kind):
    model, x, brain = _setup(2)
    weight = next(model.parameters())

    def loss(w):
        with torch.no_grad():
            weight.copy_(w)
        return _penalty(kind, model, x, brain).sum()

    # autograd gradient of the penalty with respect to the first conv weight vs central differences
    w0 = weight.detach().clone()
    weight.grad = None
    pen = _penalty(kind, model, x, brain).sum()
    (analytic,) = torch.autograd.grad(pen, weight)
    eps = 1e-6
    for idx in [(0, 0, 0, 0, 0), (1, 0, 1, 2, 0), (0, 0, 2, 1, 1)]:
        up, down = w0.clone(), w0.clone()
        up[idx] += eps
        down[idx] -= eps
        numeric = (loss(up) - loss(down)) / (2 * eps)
        assert torch.isclose(analytic[idx], numeric, rtol=1e-4, atol=1e-8), (idx, analytic[idx], numeric)
    with torch.no_grad():
        weight.copy_(w0)


@pytest.mark.parametrize("kind", ["invariance", "gradient", "signed"])
def test_compute_loss_adds_the_weighted_penalty(kind):
    model, x, brain = _setup(3)
    y, w = torch.tensor([0, 1]), torch.ones(2, dtype=x.dtype)
    base = compute_loss(model, x, brain, y, w, "grazplus")
    more = compute_loss(model, x, brain, y, w, "grazplus", outside_penalty=kind, outside_penalty_weight=2.0)
    pen = _penalty(kind, model, x, brain, y)
    assert torch.isclose(more.loss, base.loss + 2.0 * pen.mean(), rtol=1e-8)
    with torch.no_grad():  # validation: the gradient penalty is still measured
        assert torch.isclose(compute_loss(model, x, brain, y, w, "grazplus", outside_penalty=kind,
                                          outside_penalty_weight=2.0).loss, more.loss.detach(), rtol=1e-8)


def test_trainer_runs_with_an_outside_penalty_and_keeps_old_fingerprints(tmp_path):
    base = TrainSettings(mode="grazplus", epochs=1)
    assert base.fingerprint([0, 1]) == TrainSettings(mode="grazplus", epochs=1, outside_penalty="none",
                                                    outside_penalty_weight=5.0).fingerprint([0, 1])
    assert base.fingerprint([0, 1]) != TrainSettings(outside_penalty="invariance").fingerprint([0, 1])
    torch.manual_seed(0)
    images = torch.rand(4, 1, *SHAPE)
    masks = torch.zeros_like(images)
    masks[..., 2:6, 2:6, 2:6] = 1
    data = TrainingData(images, masks, torch.tensor([0, 1, 0, 1]), 2)
    arch = Architecture(SHAPE, n_classes=2, n_blocks=1, channels=2, dense_units=4)
    settings = TrainSettings(mode="grazplus", epochs=1, batch_size=2, accumulation_steps=1, device="cpu",
                             progress=False, outside_penalty="gradient")
    result = Trainer(arch, settings, tmp_path / "w").fit(data, [0, 1, 2, 3], [0, 1])
    assert result.history[-1]["train_loss"] == result.history[-1]["train_loss"]  # finite, not NaN


def test_signed_penalty_is_refused_for_other_architectures():
    from grazbids.engine import kondrateva_architecture
    with pytest.raises(ValueError, match="signed outside penalty needs the 'grazplus' architecture"):
        Trainer(kondrateva_architecture(SHAPE), TrainSettings(mode="plain", outside_penalty="signed"))
