"""Counterfactual warp simulator (grazbids.counterfactual): warps, Jacobians, conditional
convolution, losses, training against a frozen classifier, bundles and their errors."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grazbids.counterfactual import (
    ConditionalConv3d, ConditionalUNet, SimulatorArchitecture, SimulatorBundleError, SimulatorSettings,
    SimulatorTrainer, integrate_velocity, jacobian_determinant, load_simulator, log_volume_change, warp,
)
from grazbids.counterfactual.__main__ import main as cf_main
from grazbids.counterfactual.bundle import SIMULATOR_DIR, SIMULATOR_WEIGHTS, save_simulator
from grazbids.counterfactual.losses import cycle_loss, disease_log_odds, displacement, logit_shift_hinge, smoothness
from grazbids.counterfactual.run import train_simulator
from grazbids.counterfactual.warp import folded_fraction, identity_grid
from grazbids.engine import Architecture, IntensityNormalisation, build_model, save_bundle

SHAPE = (12, 14, 10)


def _grid(shape=SHAPE, dtype=torch.float64):
    return identity_grid(shape, dtype=dtype)


# --------------------------------------------------------------------------- warps and Jacobians
def test_zero_field_is_the_identity_warp():
    image = torch.rand(2, 1, *SHAPE)
    assert torch.allclose(warp(image, torch.zeros(2, 3, *SHAPE)), image, atol=1e-6)


def test_integer_shift_moves_the_image_by_that_many_voxels():
    image = torch.rand(1, 1, *SHAPE, dtype=torch.float64)
    u = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    u[:, 1] = 2.0  # sample two voxels further along the second axis
    out = warp(image, u)
    assert torch.allclose(out[..., :-2, :], image[..., 2:, :])
    assert (out[..., -2:, :] == 0).all()  # sampled outside the image


@pytest.mark.parametrize("scale", [0.8, 1.25])
def test_jacobian_of_uniform_scaling(scale):
    p = _grid()
    centre = torch.tensor([5.5, 6.5, 4.5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    u = (scale - 1.0) * (p - centre)
    det = jacobian_determinant(u)
    assert torch.allclose(det, torch.full_like(det, scale ** 3))
    assert torch.allclose(log_volume_change(u), torch.full_like(det, -3 * np.log(scale)))


def test_jacobian_of_a_known_affine():
    a = torch.tensor([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]], dtype=torch.float64)
    p = _grid()
    u = torch.einsum("ij,bj...->bi...", a - torch.eye(3, dtype=torch.float64), p) + 0.7
    det = jacobian_determinant(u)
    assert torch.allclose(det, torch.full_like(det, float(torch.linalg.det(a))))


def test_jacobian_of_a_radial_expansion_matches_the_closed_form():
    shape = (40, 40, 40)
    p = _grid(shape)
    centre = torch.full((1, 3, 1, 1, 1), 19.5, dtype=torch.float64)
    d = p - centre
    r2 = (d ** 2).sum(1)
    a = 1e-4  # p -> p + a r^2 (p - c): det = (1 + a r^2)^2 (1 + 3 a r^2)
    u = a * r2[:, None] * d
    det = jacobian_determinant(u)
    expected = (1 + a * r2) ** 2 * (1 + 3 * a * r2)
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))  # central differences
    assert torch.allclose(det[inner], expected[inner], rtol=2e-3)
    assert float((det[inner] - 1).abs().max()) > 0.5  # not a trivial field


def test_folding_is_detected():
    u = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    u[:, 0] = -1.5 * (_grid()[:, 0] - 6)  # 1 + du/dx = -0.5: a reflection
    assert folded_fraction(u) == 1.0
    assert folded_fraction(torch.zeros_like(u)) == 0.0


def test_scaling_and_squaring_gives_an_invertible_field():
    p = _grid((24, 24, 24)) * (2 * np.pi / 24)
    d, h, w = p[:, 0], p[:, 1], p[:, 2]
    v = torch.stack([6 * torch.sin(d) + 2 * torch.cos(h), 5 * torch.sin(h) + 2 * torch.sin(w),
                     6 * torch.sin(w) + 2 * torch.cos(d)], dim=1)
    u = integrate_velocity(v, 7)
    assert float(jacobian_determinant(v).min()) < 0  # the velocity itself as a displacement folds
    assert float(jacobian_determinant(u).min()) > 0  # its exponential does not
    back = integrate_velocity(-v, 7)
    image = F.avg_pool3d(torch.rand(1, 1, 24, 24, 24, dtype=torch.float64), 5, stride=1, padding=2)
    cycled = warp(warp(image, u), back)
    inner = (slice(None), slice(None), *(slice(7, -7),) * 3)
    assert float((cycled - image)[inner].abs().mean()) < 0.2 * float((image - image.mean())[inner].abs().mean())


# --------------------------------------------------------------------------- conditional convolution
def test_one_expert_is_a_plain_convolution_scaled_by_its_routing_weight():
    torch.manual_seed(0)
    conv = ConditionalConv3d(2, 3, n_experts=1).double()
    with torch.no_grad():
        conv.routing.weight.normal_()
        conv.bias.normal_()
    x = torch.rand(2, 2, 6, 7, 5, dtype=torch.float64)
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = conv.routing_weights(x, c)[:, 0]
    assert not torch.allclose(r[0], r[1])  # the routing depends on the sample and c
    out = conv(x, c)
    for i in range(2):
        plain = F.conv3d(x[i:i + 1], r[i] * conv.weight[0], r[i] * conv.bias[0], padding=1)
        assert torch.allclose(out[i:i + 1], plain)
    # with the routing saturated at 1 it is exactly the expert's convolution
    with torch.no_grad():
        conv.routing.weight.zero_()
        conv.routing.bias.fill_(50.0)
    assert torch.allclose(conv(x, c), F.conv3d(x, conv.weight[0], conv.bias[0], padding=1))


def test_several_experts_mix_the_kernels_per_sample():
    torch.manual_seed(1)
    conv = ConditionalConv3d(1, 2, n_experts=3).double()
    with torch.no_grad():
        conv.routing.weight.normal_()
    x = torch.rand(2, 1, 5, 5, 5, dtype=torch.float64)
    c = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = conv.routing_weights(x, c)
    out = conv(x, c)
    for i in range(2):
        kernel = sum(r[i, k] * conv.weight[k] for k in range(3))
        bias = sum(r[i, k] * conv.bias[k] for k in range(3))
        assert torch.allclose(out[i:i + 1], F.conv3d(x[i:i + 1], kernel, bias, padding=1))


# --------------------------------------------------------------------------- losses
def test_a_field_and_its_exact_inverse_give_zero_cycle_loss():
    image = torch.zeros(1, 1, *SHAPE, dtype=torch.float64)
    image[..., 4:8, 4:10, 3:7] = torch.rand(4, 6, 4, dtype=torch.float64)  # zero near the borders
    forward = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    forward[:, 0], forward[:, 2] = 2.0, -1.0
    assert float(cycle_loss(image, warp(warp(image, forward), -forward))) < 1e-12  # zero up to rounding
    assert float(cycle_loss(image, warp(warp(image, forward), forward))) > 0.01


def test_hinge_and_smoothness():
    before, after = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0])
    c = torch.tensor([1.0, 1.0])
    assert torch.allclose(logit_shift_hinge(before, after, c, 2.0), torch.tensor([0.0, 1.0]))
    assert torch.allclose(logit_shift_hinge(before, after, -c, 2.0), torch.tensor([5.0, 3.0]))
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert torch.allclose(disease_log_odds(logits, 1), torch.tensor([2.0, -1.0]))
    assert float(smoothness(torch.ones(1, 3, *SHAPE))) == 0.0
    ramp = _grid().float() * 0.5
    assert abs(float(smoothness(ramp)) - 0.5 / 3) < 1e-6  # each component changes along one axis
    assert abs(float(smoothness(ramp, "l2")) - 0.25 / 3) < 1e-6  # squared differences
    bump = torch.zeros(1, 3, *SHAPE)
    bump[0, 0, 4, 4, 4] = 1.0  # unit steps cost the same; l2 makes smaller ones cheaper, larger ones dearer
    assert float(smoothness(bump, "l2")) == pytest.approx(float(smoothness(bump, "l1")))
    with pytest.raises(ValueError, match="smoothness penalty"):
        smoothness(ramp, "l3")


def test_displacement_charges_the_uniform_shift_that_smoothness_does_not():
    shift = torch.zeros(2, 3, *SHAPE)
    shift[0, 0], shift[1, 2] = 0.5, -2.0
    assert torch.allclose(smoothness(shift, "l2"), torch.zeros(2))
    assert torch.allclose(displacement(shift), torch.tensor([0.25, 4.0]))


def test_centring_or_the_displacement_term_run_as_a_second_phase_and_leave_earlier_fingerprints():
    assert len(SimulatorSettings(epochs=16).phases()) == 1  # neither: one phase, as the paper
    first, second = SimulatorSettings(epochs=16, displacement_weight=10.0, margin=2.0).phases()
    assert (first.epochs, first.displacement_weight, second.epochs, second.displacement_weight) == (12, 0.0, 4, 10.0)
    assert [p.epochs for p in SimulatorSettings(epochs=16).phases(centred=True)] == [12, 4]
    assert [p.displacement_weight for p in SimulatorSettings(epochs=16).phases(centred=True)] == [0.0, 0.0]
    assert [p.epochs for p in SimulatorSettings(epochs=30, second_phase_epochs=10, displacement_weight=1).phases()] == [20, 10]
    assert len(SimulatorSettings(epochs=3, displacement_weight=10.0).phases()) == 1  # a quarter of 3 epochs is none
    assert len(SimulatorSettings(epochs=16, second_phase_epochs=0).phases(centred=True)) == 1
    only = SimulatorSettings(epochs=16, displacement_weight=0.0).phases()[0]
    assert (only.epochs, only.displacement_weight) == (16, 0.0)
    for bad in ({"second_phase_epochs": 16}, {"second_phase_epochs": -1}, {"displacement_weight": -1.0}):
        with pytest.raises(ValueError, match="second-phase|displacement"):
            SimulatorSettings(epochs=16, **bad)
    # the first phase is the one-phase training of before the option: its checkpoints resume
    arch, index = SimulatorArchitecture(SHAPE), np.arange(3)
    unweighted = "c0d8804603e9832f"  # the fingerprint of SimulatorSettings() (then margin 2) at commit 70ecbd5
    assert first.fingerprint(arch, "sha", index) == unweighted
    assert second.fingerprint(arch, "sha", index) != unweighted
    state = ConditionalUNet(_arch(SHAPE)).state_dict()
    assert second.fingerprint(arch, "sha", index, state) != second.fingerprint(arch, "sha", index)


def test_smoothness_settings_default_to_l2_with_its_own_weight():
    assert (SimulatorSettings().smoothness_penalty, SimulatorSettings().smoothness_weight) == ("l2", 1e5)
    assert SimulatorSettings(smoothness_penalty="l1").smoothness_weight == 1.0
    assert SimulatorSettings(smoothness_penalty="l1", smoothness_weight=0.5).smoothness_weight == 0.5
    with pytest.raises(ValueError, match="smoothness penalty"):
        SimulatorSettings(smoothness_penalty="tv")


# --------------------------------------------------------------------------- training
def _atrophy_task(n=8, size=12, seed=0):
    """Class 1 has a larger dark 'ventricle' in a bright 'brain' (an expansion the simulator can learn)."""
    g = torch.Generator().manual_seed(seed)
    p = identity_grid((size,) * 3)[0]
    r = ((p - (size - 1) / 2) ** 2).sum(0).sqrt()
    labels = torch.arange(n) % 2
    radius = 1.5 + 1.5 * labels.float() + 0.3 * torch.rand(n, generator=g)
    brain = (r < size * 0.45).float()
    images = torch.stack([brain * (0.3 + 0.7 * torch.sigmoid(3 * (r - rad))) for rad in radius])[:, None]
    return images, brain.expand(n, 1, size, size, size).clone(), labels


def _classifier(images, labels, epochs=40):
    torch.manual_seed(0)
    model = build_model(Architecture(tuple(images.shape[2:]), n_classes=2, n_blocks=2, channels=4, dense_units=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.project_biases_()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained_classifier():
    images, masks, labels = _atrophy_task()
    model = _classifier(images, labels)
    assert (model(images).argmax(1) == labels).float().mean() >= 0.9
    return model, images, masks, labels


def _arch(shape=(12, 12, 12), **kw):
    return SimulatorArchitecture(shape, channels=(4, 8), n_experts=2, field_downsample=1, **kw)


def test_gradients_reach_the_simulator_and_never_change_the_classifier(trained_classifier):
    model, images, masks, labels = trained_classifier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = SimulatorSettings(epochs=1, batch_size=4, progress=False, device="cpu")
    trainer = SimulatorTrainer(_arch(), settings)
    torch.manual_seed(0)
    sim = ConditionalUNet(_arch())
    from grazbids.counterfactual.training import freeze

    terms, *_ = trainer.step_losses(sim, freeze(model), images[:4], masks[:4], torch.tensor([1.0, -1, 1, -1]), 1)
    terms["loss"].mean().backward()
    grads = [p.grad for p in sim.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.parameters())
    fit = trainer.fit(model, images, masks, labels, positive=1, classifier_sha256="x")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(fit.history) == 1 and np.isfinite(fit.history[0]["loss"])


def test_the_second_phase_continues_the_first_with_the_displacement_term(trained_classifier, tmp_path):
    model, images, masks, labels = trained_classifier
    settings = SimulatorSettings(epochs=3, second_phase_epochs=1, displacement_weight=10.0, batch_size=4,
                                 learning_rate=3e-3, progress=False, device="cpu")
    fit = SimulatorTrainer(_arch(), settings, tmp_path).fit(model, images, masks, labels, 1, "x")
    assert [row["epoch"] for row in fit.history] == [1, 2, 3]
    for row in fit.history:  # the loss holds the displacement term in the last epoch only
        rest = row["hinge"] + settings.smoothness_weight * row["smoothness"] + row["cycle"]
        weight = 10.0 if row["epoch"] == 3 else 0.0
        assert row["loss"] == pytest.approx(rest + weight * row["displacement"], rel=1e-4)
        assert row["displacement"] > 0
    assert (tmp_path / "second_phase" / "checkpoint.safetensors").exists()
    assert (tmp_path / "history.tsv").read_text().count("\n") == 4  # header + both phases
    # the first phase alone is the same training as without the option
    alone = SimulatorSettings(**{**settings.__dict__, "epochs": 2, "second_phase_epochs": 0, "displacement_weight": 0})
    first = SimulatorTrainer(_arch(), alone).fit(model, images, masks, labels, 1, "x")
    assert first.history == fit.history[:2]


def test_a_centred_simulator_trains_uncentred_first_then_centred(trained_classifier, tmp_path):
    model, images, masks, labels = trained_classifier
    settings = SimulatorSettings(epochs=3, second_phase_epochs=1, batch_size=4, learning_rate=3e-3,
                                 progress=False, device="cpu")
    centred = _arch(centre_field=True)
    fit = SimulatorTrainer(centred, settings, tmp_path).fit(model, images, masks, labels, 1, "x")
    assert fit.simulator.arch.centre_field and [row["epoch"] for row in fit.history] == [1, 2, 3]
    # the first phase is the uncentred training (same checkpoints), the second starts from its weights
    free = SimulatorTrainer(replace(centred, centre_field=False), replace(settings, epochs=2)).fit(
        model, images, masks, labels, 1, "x")
    assert free.history == fit.history[:2]
    with torch.no_grad():
        u = fit.simulator(images[:2], torch.tensor([1.0, -1.0]), masks[:2])
    for b in range(2):
        assert float(u[b][:, masks[b, 0] > 0.5].mean(dim=1).abs().max()) < 1e-5
    assert (tmp_path / "second_phase" / "checkpoint.safetensors").exists()


def test_a_held_outline_keeps_the_field_zero_outside_and_at_the_brain_edge():
    torch.manual_seed(0)
    brain = torch.zeros(1, 1, 16, 16, 16)
    brain[..., 3:13, 3:13, 3:13] = 1
    arch = SimulatorArchitecture((16, 16, 16), channels=(4, 8), n_experts=2, field_downsample=1, hold_outline_voxels=2)
    sim = ConditionalUNet(arch)
    torch.nn.init.normal_(sim.head.weight, std=0.1)  # a large field everywhere before the weighting
    u = sim(torch.rand(1, 1, 16, 16, 16) * brain, torch.tensor([1.0]), brain)
    size = u.detach().norm(dim=1)[0]
    assert float(size[brain[0, 0] == 0].abs().max()) == 0.0  # outside the brain
    assert float(size[3, 3:13, 3:13].max()) == 0.0 and float(size[8, 8, 3]) == 0.0  # its outermost layer
    assert float(size[8, 8, 8]) > 1e-3  # deep inside it moves
    with pytest.raises(ValueError, match="needs the brain mask"):
        sim(torch.rand(1, 1, 16, 16, 16), torch.tensor([1.0]))
    # off by default, and then absent from the card: earlier fingerprints and bundles stay valid
    assert "hold_outline_voxels" not in _arch().to_dict()
    assert SimulatorArchitecture.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize("diffeomorphic,downsample", [(False, 1), (True, 2)])
def test_a_centred_field_cannot_shift_the_brain_and_keeps_its_jacobian(diffeomorphic, downsample):
    torch.manual_seed(0)
    brain = torch.zeros(2, 1, 16, 16, 16)
    brain[0, :, 3:13, 3:13, 3:13] = 1
    brain[1, :, 5:11, 2:14, 4:12] = 1
    shared = dict(channels=(4, 8), n_experts=2, field_downsample=downsample, diffeomorphic=diffeomorphic)
    free = ConditionalUNet(SimulatorArchitecture((16, 16, 16), **shared))
    torch.nn.init.normal_(free.head.weight, std=0.1)
    torch.nn.init.constant_(free.head.bias, 0.5)  # a shift of the whole image
    centred = ConditionalUNet(SimulatorArchitecture((16, 16, 16), centre_field=True, **shared))
    centred.load_state_dict(free.state_dict())
    x, c = torch.rand(2, 1, 16, 16, 16) * brain, torch.tensor([1.0, -1.0])
    u_free, u = free(x, c, brain).detach(), centred(x, c, brain).detach()
    for b in range(2):  # each sample's own brain: mean displacement 0, by a constant difference
        inside = brain[b, 0] > 0
        assert float(u_free[b][:, inside].mean(dim=1).abs().max()) > 0.1
        assert float(u[b][:, inside].mean(dim=1).abs().max()) < 1e-5
        difference = (u_free[b] - u[b]).flatten(1)
        assert float((difference - difference[:, :1]).abs().max()) < 1e-5
    assert torch.allclose(log_volume_change(u), log_volume_change(u_free), atol=1e-5)
    with pytest.raises(ValueError, match="needs the brain mask"):
        centred(x, c)
    assert "centre_field" not in _arch().to_dict()
    assert SimulatorArchitecture.from_dict(centred.arch.to_dict()) == centred.arch


@pytest.mark.slow
def test_training_shifts_the_decision_and_resumes_identically(trained_classifier, tmp_path):
    model, images, masks, labels = trained_classifier
    settings = SimulatorSettings(epochs=4, batch_size=4, learning_rate=3e-3, margin=2.0, progress=False,
                                 device="cpu", smoothness_weight=0.1, cycle_weight=1.0)
    fit = SimulatorTrainer(_arch(), settings, tmp_path / "a").fit(model, images, masks, labels, 1, "x")
    assert fit.history[-1]["hinge"] < fit.history[0]["hinge"]
    # interrupted after 3 epochs, then resumed: bit-identical weights
    short = SimulatorSettings(**{**settings.__dict__, "epochs": 2})
    SimulatorTrainer(_arch(), short, tmp_path / "b").fit(model, images, masks, labels, 1, "x")
    resumed = SimulatorTrainer(_arch(), settings, tmp_path / "b").fit(model, images, masks, labels, 1, "x")
    for (k, v), w in zip(fit.simulator.state_dict().items(), resumed.simulator.state_dict().values()):
        assert torch.equal(v, w), k
    assert (tmp_path / "b" / "history.tsv").read_text().count("\n") == 5


def test_a_constant_field_is_reported_as_a_dead_simulator(trained_classifier):
    model, images, masks, labels = trained_classifier
    settings = SimulatorSettings(epochs=3, batch_size=4, learning_rate=0.0, progress=False, device="cpu")
    arch = _arch()
    trainer = SimulatorTrainer(arch, settings)
    # a zero head: the field is 0 for every input, nothing can be learnt at lr 0
    orig = ConditionalUNet.__init__

    def zero_head(self, a):
        orig(self, a)
        torch.nn.init.zeros_(self.head.weight)

    ConditionalUNet.__init__ = zero_head
    try:
        fit = trainer.fit(model, images, masks, labels, 1, "x")
    finally:
        ConditionalUNet.__init__ = orig
    assert fit.collapsed_epoch == 1 and len(fit.history) == 1


# --------------------------------------------------------------------------- bundles
def _card(shape, classes=("control", "patient")):
    return {"mode": "plain", "seed": 0, "classes": list(classes), "target_column": "diagnosis",
            "input": {"template": "MNI152NLin2009aSym", "resolution": 2, "grid_shape": list(shape),
                      "intensity_normalisation": IntensityNormalisation().to_dict()},
            "training_data": {"dataset": "test"}}


def _bundle(tmp_path, model, name="model"):
    return save_bundle(tmp_path / name, model, _card(model.arch.input_shape))


def test_bundle_round_trip_and_mismatched_classifier(trained_classifier, tmp_path):
    model, images, masks, labels = trained_classifier
    bundle = _bundle(tmp_path, model)
    settings = SimulatorSettings(epochs=1, batch_size=4, progress=False, device="cpu")
    out = train_simulator(bundle, images, masks, labels, settings, field_downsample=2, channels=(4, 8),
                          n_experts=2, workdir=tmp_path / "work")
    assert out == bundle / SIMULATOR_DIR
    sim, card = load_simulator(bundle)
    assert card["classifier"]["positive_class"] == "patient" and card["architecture"]["field_downsample"] == 2
    assert card["training"]["n_correctly_classified_used"] >= 7
    c = torch.tensor([1.0, -1.0])
    torch.manual_seed(0)
    with torch.no_grad():
        fresh = ConditionalUNet(SimulatorArchitecture.from_dict(card["architecture"]))
        fresh.load_state_dict(sim.state_dict())
        assert torch.equal(sim(images[:2], c, masks[:2]), fresh(images[:2], c, masks[:2]))
    assert card["architecture"]["centre_field"] and card["training"]["epochs_per_phase"] == [1]  # a quarter of 1: 0
    # another classifier (retrained: other weights) in the same folder is refused
    other = build_model(model.arch)
    save_bundle(tmp_path / "other", other, _card(model.arch.input_shape))
    import shutil

    shutil.copytree(bundle / SIMULATOR_DIR, tmp_path / "other" / SIMULATOR_DIR)
    with pytest.raises(SimulatorBundleError, match="trained against the classifier with weights SHA-256"):
        load_simulator(tmp_path / "other")
    # truncated weights
    weights = bundle / SIMULATOR_DIR / SIMULATOR_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SimulatorBundleError, match="truncated or replaced"):
        load_simulator(bundle)


def test_one_class_classifier_is_refused(tmp_path):
    bundle = tmp_path / "model"
    bundle.mkdir()
    card = _card((12, 12, 12), classes=("control",))
    card.update(format="grazbids-model", format_version=1, grazbids_version="x",
                architecture={"input_shape": [12, 12, 12], "n_classes": 1})
    (bundle / "model_card.json").write_text(json.dumps(card))
    (bundle / "model.safetensors").write_bytes(b"")
    images, masks, labels = _atrophy_task(n=4)
    with pytest.raises(SimulatorBundleError, match="has 1 class"):
        train_simulator(bundle, images, masks, labels, SimulatorSettings(epochs=1, progress=False))
    assert not (bundle / SIMULATOR_DIR).exists()


# --------------------------------------------------------------------------- command line
def _preprocessed(tmp_path, images, masks):
    """Template-space NIfTI pairs as the participant level writes them."""
    import nibabel as nb

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = []
    for i in range(2):
        t1w = tmp_path / f"sub-{i}_T1w.nii.gz"
        mask = tmp_path / f"sub-{i}_mask.nii.gz"
        nb.save(nb.Nifti1Image(images[i, 0].numpy() * 500, affine), t1w)
        nb.save(nb.Nifti1Image(masks[i, 0].numpy(), affine), mask)
        paths.append((t1w, mask))
    return paths


def test_cli_apply_writes_everything_and_errors_have_exit_codes(trained_classifier, tmp_path, capsys):
    model, images, masks, labels = trained_classifier
    bundle = _bundle(tmp_path, model)
    assert cf_main(["apply", str(bundle), "x.nii.gz", "m.nii.gz", str(tmp_path / "out")]) == 65  # no simulator
    assert "no simulator card" in capsys.readouterr().err
    sim = ConditionalUNet(_arch())
    from grazbids.counterfactual.bundle import classifier_hash

    save_simulator(bundle, sim, {"classifier": {"sha256": classifier_hash(bundle), "positive_class": "patient"}})
    (t1w, mask), _ = _preprocessed(tmp_path, images, masks)
    out = tmp_path / "out"
    assert cf_main(["apply", str(bundle), str(t1w), str(mask), str(out), "--prefix", "sub-0_", "--device", "cpu"]) == 0
    for direction in ("inject", "remove"):
        meta = json.loads((out / f"sub-0_desc-{direction}_counterfactual.json").read_text())
        assert set(meta["ProbabilitiesBefore"]) == {"control", "patient"} and meta["Direction"] == direction
        for kind in ("T1w", "displacement", "logjacobian"):
            assert (out / f"sub-0_desc-{direction}_{kind}.nii.gz").is_file()
    assert not list(out.glob(".*"))
    assert cf_main(["apply", str(tmp_path / "none"), str(t1w), str(mask), str(out)]) == 66
    # a simulator of another classifier: 65, nothing written
    save_bundle(tmp_path / "other", build_model(model.arch), _card(model.arch.input_shape))
    import shutil

    shutil.copytree(bundle / SIMULATOR_DIR, tmp_path / "other" / SIMULATOR_DIR)
    assert cf_main(["apply", str(tmp_path / "other"), str(t1w), str(mask), str(tmp_path / "out2")]) == 65
    assert "trained against the classifier" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    with pytest.raises(SystemExit) as exit_info:
        cf_main(["train", str(bundle), str(tmp_path), str(tmp_path), "--epochs", "0"])
    assert exit_info.value.code == 64
    for bad in (["--second-phase-epochs", "4"], ["--displacement-epochs", "4"], ["--displacement-weight", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            cf_main(["train", str(bundle), str(tmp_path), str(tmp_path), "--epochs", "4", *bad])
        assert exit_info.value.code == 64
    assert "--displacement-weight must be >= 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- participant level
def test_participant_level_adds_counterfactual_outputs_when_the_bundle_holds_a_simulator(trained_classifier, tmp_path):
    from grazbids.counterfactual.bundle import classifier_hash
    from grazbids.interfaces.counterfactual import ParticipantCounterfactual
    from grazbids.workflows.inference import counterfactual_sink_names, init_inference_wf

    model, images, masks, labels = trained_classifier
    bundle = _bundle(tmp_path, model)
    kwargs = dict(model_dir=bundle, device="cpu", bids_dir=tmp_path, output_dir=tmp_path / "out",
                  template="MNI152NLin2009aSym", resolution=2)
    assert "counterfactual" not in init_inference_wf(**kwargs).list_node_names()
    assert counterfactual_sink_names(bundle) == ()  # the participant report waits for no such sink
    save_simulator(bundle, ConditionalUNet(_arch()), {"classifier": {"sha256": classifier_hash(bundle),
                                                                      "positive_class": "patient"}})
    names = init_inference_wf(**kwargs).list_node_names()
    for name in ("counterfactual", "inject_logjacobian_to_native", "ds_inject_T1w", "ds_remove_displacement",
                 "ds_remove_logjacobian", "ds_remove_logjacobian_native"):
        assert name in names
    assert len(counterfactual_sink_names(bundle)) == 8 and set(counterfactual_sink_names(bundle)) <= set(names)
    (t1w, mask), _ = _preprocessed(tmp_path, images, masks)
    t1w.with_name(t1w.name.replace(".nii.gz", ".json")).write_text('{"SkullStripped": true}')
    node = ParticipantCounterfactual(t1w_template=str(t1w), brain_mask_template=str(mask), model_dir=str(bundle),
                                     device="cpu")
    work = tmp_path / "node"
    work.mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = node.run()
    finally:
        os.chdir(cwd)
    out = result.outputs
    import pickle

    assert pickle.loads(pickle.dumps(out)).remove_logjacobian == out.remove_logjacobian  # Nipype pickles results
    assert out.inject_t1w_metadata["SkullStripped"] is True and "SkullStripped" not in out.inject_metadata
    assert set(out.remove_metadata["ProbabilitiesAfter"]) == {"control", "patient"}
    import nibabel as nb

    field = nb.load(out.inject_displacement)
    assert field.shape == (12, 12, 12, 3) and field.header.get_intent()[0] == "displacement vector"
    _assert_participant_report_section(tmp_path / "derivatives", t1w, mask, out)


def _assert_participant_report_section(derivatives, t1w, mask, out):
    """The node's outputs under the names the sinks give them: the participant report's
    counterfactual section shows the probabilities of the node's own metadata."""
    import shutil

    from grazbids.reports import discover_t1w_outputs, render_t1w_section

    anat = derivatives / "sub-0" / "anat"
    anat.mkdir(parents=True)
    stem = anat / "sub-0_space-MNI152NLin2009aSym_res-2"
    shutil.copy(t1w, f"{stem}_desc-preproc_T1w.nii.gz")
    shutil.copy(mask, f"{stem}_desc-brain_mask.nii.gz")
    for direction in ("inject", "remove"):
        for kind in ("T1w", "logjacobian"):
            shutil.copy(getattr(out, f"{direction}_{kind}"), f"{stem}_desc-{direction}_{kind}.nii.gz")
            meta = getattr(out, f"{direction}_{'t1w_' if kind == 'T1w' else ''}metadata")
            Path(f"{stem}_desc-{direction}_{kind}.json").write_text(json.dumps(meta))
    (outputs,) = discover_t1w_outputs(derivatives, "0")
    html = render_t1w_section(outputs, derivatives)
    assert "<h3>Counterfactual simulation</h3>" in html and html.count("data:image/png;base64,") == 4
    for direction in ("inject", "remove"):
        meta = getattr(out, f"{direction}_metadata")
        assert meta["PositiveClass"] == "patient"
        before, after = meta["ProbabilitiesBefore"]["patient"], meta["ProbabilitiesAfter"]["patient"]
        assert f"<td>{before:.3f} → {after:.3f}</td>" in html


# --------------------------------------------------------------------------- group level
def test_group_option_adds_a_counterfactual_node_before_the_report(tmp_path, monkeypatch):
    from dataclasses import replace

    import networkx

    from cli_helpers import fake_participant_builder
    from grazbids.cli.parser import parse_args
    from grazbids.workflows import base

    monkeypatch.setattr(base, "load_participant_builder", fake_participant_builder)
    for folder in ("bids", "out"):
        (tmp_path / folder).mkdir()
    args = [str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--target-column", "dx"]
    assert parse_args(args).counterfactual == 0
    assert parse_args(args + ["--counterfactual"]).counterfactual == 30
    config = parse_args(args + ["--counterfactual", "5"])
    config = replace(config, t1w_files={"01": (tmp_path / "a.nii.gz",)}, group_participants=("01",))
    graph = base.init_grazbids_wf(config)._create_flat_graph()
    node = {n.fullname.split(".", 1)[-1]: n for n in graph.nodes}
    train, cf, report = node["group_wf.train"], node["group_wf.counterfactual"], node["group_wf.report"]
    assert cf.inputs.settings["counterfactual"] == 5 and train.inputs.settings["counterfactual"] == 5
    assert networkx.has_path(graph, train, cf) and networkx.has_path(graph, cf, report)


def test_group_counterfactual_writes_the_simulator_and_group_maps(trained_classifier, tmp_path, monkeypatch):
    import nibabel as nb

    from grazbids.counterfactual import group as group_module

    model, images, masks, labels = trained_classifier
    bundle = _bundle(tmp_path / "group" / "mode-plain", model)
    monkeypatch.setattr(group_module, "load_training_images",
                        lambda card, bids, out, participants: (images, masks, labels, [f"{i:02d}" for i in range(8)]))
    monkeypatch.setattr(group_module, "_reference",
                        lambda out, tpl, res: nb.Nifti1Image(np.zeros((12, 12, 12), np.float32), np.eye(4)))
    from grazbids.counterfactual import run as run_module

    real_train = run_module.train_simulator
    monkeypatch.setattr(group_module, "train_simulator", lambda *a, **k: real_train(
        *a, **{**k, "field_downsample": 1, "channels": (4, 8), "n_experts": 2}))
    out = group_module.group_counterfactual(bundle, bids_dir=tmp_path, output_dir=tmp_path, participants=[],
                                            epochs=1, seed=0, device="cpu", workdir=tmp_path / "work")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["positive_class"] == "patient" and set(summary["maps"]) <= {"control/inject", "patient/remove"}
    assert summary["maps"] and sum(summary["n_per_map"].values()) == summary["n_correctly_classified"]
    for name in summary["maps"].values():
        assert nb.load(out / name).shape == (12, 12, 12)
    load_simulator(bundle)  # the bundle holds a simulator made for this classifier
    # the group report's section reads what was just written
    from grazbids.group.layout import ModeLayout
    from grazbids.reports.counterfactual import group_section

    html = group_section(ModeLayout(bundle.parent))
    assert "<h3>Counterfactual simulator (group-mean log-Jacobian)</h3>" in html
    assert html.count("data:image/png;base64,") == 1 and "epochs run (of requested)</th><td>1 (of 1)" in html
    for direction, fraction in summary["flip_fraction"].items():
        if fraction is not None:
            assert f"flipped by {direction} (in sample)</th><td>{100 * fraction:.2f} %" in html
    for key, n in summary["n_per_map"].items():
        assert f"class {key.replace('/', ': ')} ({n} image" in html
