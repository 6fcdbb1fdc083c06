"""Feature visualisation (activation maximisation): objectives, regularisers, known
answers on a hand-built and on a briefly trained model, bundle outputs and errors."""
import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch
from torch import nn

from grazbids.engine import Architecture, IntensityNormalisation, ModelBundleError, build_model, save_bundle
from grazbids.featurevis import (AscentSettings, Channel, ClassLogit, FourierParameterisation, Neuron,
                                 ObjectiveError, PixelParameterisation, Regularisers, class_objective,
                                 gaussian_blur, maximise, spectrum_scale, total_variation, visualise_bundle)
from grazbids.featurevis.__main__ import main as featurevis_main
from grazbids.templates import get_template

from engine_helpers import tiny_model

SHAPE = (12, 12, 12)


class RegionModel(nn.Module):
    """Known answer: a 1x1x1 conv copies the image into channel 0 and its negative into
    channel 1; logit 1 = sum of channel 0 over ``region`` and logit 0 = minus that."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
        self.head = nn.Identity()
        self.register_buffer("region", region.double())

    def forward(self, x):
        evidence = (self.conv(x)[:, 0] * self.region).sum(dim=(1, 2, 3))
        return self.head(torch.stack([-evidence, evidence], dim=1))


def _region() -> torch.Tensor:
    region = torch.zeros(SHAPE)
    region[3:6, 4:7, 6:9] = 1
    return region


def _run(model, objective, iterations=40, **kwargs):
    settings = dict(iterations=iterations, lr=kwargs.pop("lr", 0.1), seed=kwargs.pop("seed", 0),
                    start=kwargs.pop("start", "noise"), regularisers=kwargs.pop("regs", Regularisers()))
    return maximise(model, objective, AscentSettings(**settings), input_shape=SHAPE, **kwargs)


# --------------------------------------------------------------------------- known answers
def test_class_logit_of_a_region_model_lights_the_region_only():
    region = _region()
    result = _run(RegionModel(region), ClassLogit(1), regs=Regularisers(l2=0.25))
    # optimum per voxel: x = 1 / (2 * 0.25) = 2 (the clamp) in the region, 0 elsewhere
    assert torch.allclose(result.image[region > 0], torch.tensor(2.0, dtype=torch.float64))
    assert result.image[region == 0].abs().max() < 1e-6
    assert result.objective_value == pytest.approx(2.0 * region.sum().item())
    assert result.objective_value > result.start_value


def test_from_a_start_image_the_penalties_act_on_the_change():
    region = _region()
    start = torch.full(SHAPE, 1.0, dtype=torch.float64)
    result = _run(RegionModel(region), ClassLogit(1), start="image", start_image=start,
                  regs=Regularisers(l2=0.25))
    # L2 on (x - start): the region rises to the clamp, the rest stays at the start
    assert torch.all(result.image[region > 0] == 2.0)
    assert torch.allclose(result.image[region == 0], torch.tensor(1.0, dtype=torch.float64), atol=0.02)
    assert result.penalised == "change from the start image"
    assert torch.equal(result.start_image, start)


def test_opposite_class_and_channels_give_the_expected_images():
    model = RegionModel(_region())
    assert _run(model, ClassLogit(0), regs=Regularisers(l2=0.25)).image.abs().max() < 1e-6
    brightest = _run(model, Channel("conv", 0)).image  # mean(x): every voxel to the clamp
    assert torch.all(brightest == 2.0)
    assert torch.all(_run(model, Channel("conv", 1)).image == 0.0)  # mean(-x)


def test_neuron_objective_lights_its_own_voxel():
    result = _run(RegionModel(_region()), Neuron("conv", 0, (2, 9, 5)), regs=Regularisers(l2=0.25))
    assert np.unravel_index(int(result.image.argmax()), SHAPE) == (2, 9, 5)
    assert result.image[2, 9, 5] == 2.0 and result.image.sum() == 2.0
    default = _run(RegionModel(_region()), Neuron("conv", 0), iterations=1)
    assert default.objective.voxel == (6, 6, 6)  # centre of the layer's output grid


def _lesion_task(n=32, seed=0):
    """A 'brain' cube with texture; the lesion class has a bright blob at a fixed place and
    every image has two bright distractor blobs at random places (so 'bright anywhere' is
    not the class evidence)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    mask = torch.zeros(SHAPE)
    mask[2:10, 2:10, 2:10] = 1
    images = (0.4 + 0.2 * torch.rand(n, 1, *SHAPE, generator=g)) * mask
    lesion = torch.zeros(SHAPE, dtype=torch.bool)
    lesion[3:6, 3:6, 6:9] = True
    for i in range(n):
        for _ in range(2):
            a, b, c = torch.randint(2, 8, (3,), generator=g).tolist()
            images[i, 0, a:a + 2, b:b + 2, c:c + 2] = 1.0
        if labels[i]:
            images[i, 0][lesion] = 1.0
    return images * mask, mask, labels, lesion


def test_trained_lesion_model_visualises_the_lesion():
    images, mask, labels, lesion = _lesion_task()
    torch.manual_seed(0)
    model = build_model(Architecture(SHAPE, n_classes=2, n_blocks=2, channels=4, dense_units=16))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
        model.project_biases_()
    assert (model(images).argmax(1) == labels).all()  # it learned the task
    result = maximise(model, ClassLogit(1), AscentSettings(iterations=100, lr=0.05, regularisers=Regularisers(l2=1.0)),
                      mask=mask)
    image, inside = result.image, mask > 0
    rest = inside & ~lesion
    # the lesion (5 % of the brain) gets far more than its share of the positive mass
    lesion_share = lesion.sum() / inside.sum()
    assert image[lesion].sum() / image[inside].sum() > 2 * lesion_share
    assert image[lesion].mean() > 2 * image[rest].mean()


# --------------------------------------------------------------------------- regularisers
def test_total_variation_weight_reduces_total_variation():
    model = tiny_model(SHAPE, n_classes=2, channels=4)
    plain = _run(model, ClassLogit(1), lr=0.05).image
    smooth = _run(model, ClassLogit(1), lr=0.05, regs=Regularisers(tv=0.05)).image
    assert total_variation(smooth[None, None]) < 0.7 * total_variation(plain[None, None])


def test_mask_restricts_the_image_and_clamp_keeps_the_range():
    model = RegionModel(_region())
    mask = torch.zeros(SHAPE)
    mask[2:8, 2:8, 2:8] = 1
    result = _run(model, Channel("conv", 0), mask=mask, lr=1.0)
    assert torch.all(result.image[mask == 0] == 0)
    assert torch.all(result.image[mask > 0] == 2.0)
    unclamped = _run(model, Channel("conv", 0), lr=1.0, value_range=None)
    assert unclamped.image.max() > 2.5


@pytest.mark.parametrize("regs", [Regularisers(jitter=2), Regularisers(blur_every=2, blur_sigma=0.7),
                                  Regularisers(fourier=True), Regularisers(l1=0.01, l2=0.01, tv=0.01, jitter=1,
                                                                           blur_every=3, fourier=True)])
def test_transforming_regularisers_run_finite_and_are_deterministic(regs):
    model = tiny_model(SHAPE, n_classes=2, channels=4)
    first = _run(model, ClassLogit(1), iterations=15, lr=0.05, regs=regs)
    again = _run(model, ClassLogit(1), iterations=15, lr=0.05, regs=regs)
    other = _run(model, ClassLogit(1), iterations=15, lr=0.05, regs=regs, seed=1)
    assert torch.isfinite(first.image).all() and np.isfinite(first.history).all()
    assert torch.equal(first.image, again.image) and first.history == again.history
    assert not torch.equal(first.image, other.image)
    assert first.image.min() >= 0 and first.image.max() <= 2


def test_blur_smooths_the_result_and_jitter_changes_it():
    model = tiny_model(SHAPE, n_classes=2, channels=4)
    plain = _run(model, ClassLogit(1), lr=0.05, iterations=20).image
    blurred = _run(model, ClassLogit(1), lr=0.05, iterations=20, regs=Regularisers(blur_every=1, blur_sigma=1.0)).image
    jittered = _run(model, ClassLogit(1), lr=0.05, iterations=20, regs=Regularisers(jitter=2)).image
    assert total_variation(blurred[None, None]) < 0.5 * total_variation(plain[None, None])
    assert not torch.equal(plain, jittered)


def test_gaussian_blur_keeps_constants_and_respects_the_mask():
    x = torch.full((1, 1, *SHAPE), 0.7, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(x, 1.0), x)  # normalised: no darkening at edges
    mask = torch.zeros(1, 1, *SHAPE, dtype=torch.float64)
    mask[..., :6, :, :] = 1
    x[..., 6:, :, :] = 5.0  # bright outside the mask must not leak in
    blurred = gaussian_blur(x, 1.5, mask)
    assert torch.allclose(blurred[..., :6, :, :], torch.tensor(0.7, dtype=torch.float64))
    delta = torch.zeros(1, 1, *SHAPE, dtype=torch.float64)
    delta[0, 0, 6, 6, 6] = 1.0
    spread = gaussian_blur(delta, 1.0)
    assert spread[0, 0, 6, 6, 6] < 0.1 and spread.sum() == pytest.approx(1.0, rel=1e-3)


def test_fourier_parameterisation_round_trip_and_1_over_f():
    param = FourierParameterisation(SHAPE)
    x = torch.rand(1, 1, *SHAPE, dtype=torch.float64)
    assert torch.allclose(param.decode(param.encode(x)), x, atol=1e-12)
    scale = spectrum_scale(SHAPE)
    assert scale.pow(2).mean().sqrt().item() == pytest.approx(1.0)
    assert scale[0, 0, 1] > scale[0, 0, 2] > scale[0, 0, -1]  # falls with frequency
    white = PixelParameterisation(SHAPE).noise(torch.Generator().manual_seed(0))
    tv = {decay: float(total_variation(FourierParameterisation(SHAPE, decay).noise(torch.Generator().manual_seed(0))))
          for decay in (0.0, 1.0, 2.0)}
    assert param.noise(torch.Generator().manual_seed(0)).std().item() == pytest.approx(1.0)
    # 1/f^decay noise gets smoother with the decay (decay 0 is white noise)
    assert tv[0.0] == pytest.approx(float(total_variation(white)), rel=0.05)
    assert tv[2.0] < 0.6 * tv[0.0] and tv[1.0] < 0.9 * tv[0.0] and tv[2.0] < tv[1.0]


def test_model_state_is_restored():
    model = tiny_model(SHAPE, n_classes=2, channels=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, ClassLogit(1), iterations=3)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- errors
def test_objective_errors_are_clear():
    model = tiny_model(SHAPE, n_classes=2, channels=4)
    with pytest.raises(ObjectiveError, match=r"unknown layer 'convs\.9'; Conv3d layers: convs\.0, convs\.1"):
        _run(model, Channel("convs.9", 0), iterations=1)
    with pytest.raises(ObjectiveError, match=r"'dense\.0' is a Linear, not a Conv3d"):
        _run(model, Channel("dense.0", 0), iterations=1)
    with pytest.raises(ObjectiveError, match=r"channel 4 out of range for layer 'convs\.1' \(4 channels: 0-3\)"):
        _run(model, Channel("convs.1", 4), iterations=1)
    with pytest.raises(ObjectiveError, match=r"voxel \(6, 0, 0\) is outside the output grid 6x6x6"):
        _run(model, Neuron("convs.1", 0, (6, 0, 0)), iterations=1)
    with pytest.raises(ObjectiveError, match="class index 2 out of range"):
        _run(model, ClassLogit(2), iterations=1)
    with pytest.raises(ObjectiveError, match="unknown class 'AD'; classes: CN, MCI"):
        class_objective("AD", ["CN", "MCI"])
    assert class_objective("MCI", ["CN", "MCI"]) == ClassLogit(1, "MCI")
    assert class_objective("0", ["CN", "MCI"]) == ClassLogit(0, "CN")
    with pytest.raises(ValueError, match="start_image"):
        _run(model, ClassLogit(0), start="image")
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        AscentSettings(iterations=0)
    with pytest.raises(ValueError, match="tv must be a finite number >= 0"):
        Regularisers(tv=-1)


# --------------------------------------------------------------------------- bundles
def _bundle(tmp_path, shape=None):
    template = get_template(resolution=2)
    shape = tuple(shape or template.shape)
    torch.manual_seed(0)
    model = build_model(Architecture(shape, n_classes=2, n_blocks=2, channels=2, dense_units=4))
    card = {"mode": "plain", "seed": 0, "classes": ["control", "lesion"], "target_column": "group",
            "input": {"template": template.name, "resolution": 2, "grid_shape": list(shape),
                      "intensity_normalisation": IntensityNormalisation().to_dict()},
            "training_data": {"dataset": "test"}}
    return save_bundle(tmp_path / "model", model, card), template


def test_cli_writes_nifti_sidecar_and_figure_on_the_template_grid(tmp_path, capsys):
    bundle, template = _bundle(tmp_path)
    out = tmp_path / "vis"
    code = featurevis_main([str(bundle), str(out), "--class", "lesion", "--iterations", "2", "--tv", "0.01",
                            "--l2", "0.01", "--fourier", "--jitter", "1", "--blur-every", "2", "--start", "template",
                            "--device", "cpu"])
    assert code == 0
    nifti, sidecar, png = (out / f"featurevis_class-lesion{ext}" for ext in (".nii.gz", ".json", ".png"))
    assert str(nifti) in capsys.readouterr().out
    img, tpl_mask = nb.load(nifti), nb.load(template.brain_mask)
    assert img.shape == template.shape and np.allclose(img.affine, tpl_mask.affine)
    data = img.get_fdata()
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 2
    assert np.all(data[np.asanyarray(tpl_mask.dataobj) == 0] == 0) and data.max() > 0
    meta = json.loads(sidecar.read_text())
    assert meta["Objective"] == {"Type": "class_logit", "ClassIndex": 1, "ClassName": "lesion"}
    assert meta["Regularisers"]["tv"] == 0.01 and meta["Regularisers"]["jitter"] == 1
    assert meta["Regularisers"]["clamp"] == [0.0, 2.0] and "brain mask" in meta["Regularisers"]["mask"]
    assert meta["Parameterisation"]["Type"] == "fourier" and meta["Iterations"] == 2 and meta["Seed"] == 0
    assert meta["Start"].startswith("template T1w") and np.isfinite(meta["ObjectiveValue"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_cli_errors(tmp_path, capsys):
    assert featurevis_main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--class", "x"]) == 66
    assert "model card not found" in capsys.readouterr().err
    bundle, _ = _bundle(tmp_path)
    assert featurevis_main([str(bundle), str(tmp_path / "out"), "--channel", "convs.7", "0"]) == 64
    assert "unknown layer 'convs.7'; Conv3d layers: convs.0, convs.1, convs.2, convs.3" in capsys.readouterr().err
    assert featurevis_main([str(bundle), str(tmp_path / "out"), "--class", "AD"]) == 64
    assert "unknown class 'AD'; classes: control, lesion" in capsys.readouterr().err
    assert featurevis_main([str(bundle), "--list-layers"]) == 0
    assert "convs.3: Conv3d, 2 channels" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        featurevis_main([str(bundle), str(tmp_path / "out")])  # no objective
    assert not (tmp_path / "out").exists()


def test_bundle_errors(tmp_path):
    with pytest.raises(ModelBundleError, match="model card not found"):
        visualise_bundle(tmp_path / "missing", tmp_path / "out", "lesion")
    small, _ = _bundle(tmp_path, shape=(16, 16, 16))
    with pytest.raises(ValueError, match=r"grid \(16, 16, 16\) differs from template"):
        visualise_bundle(small, tmp_path / "out", "lesion")


def test_group_feature_visualisation_node_and_report_section(tmp_path):
    from grazbids.interfaces.featurevis import GroupFeatureVisualisation
    from grazbids.reports import write_group_report
    from report_helpers import write_group_outputs

    out = tmp_path / "out"
    write_group_outputs(out)
    mode_dir = out / "group" / "mode-grazplus"
    before = write_group_report(out).read_text().count("data:image/png;base64,")
    bundle, _ = _bundle(mode_dir)
    result = GroupFeatureVisualisation(model_dirs=[str(bundle)], iterations=2, device="cpu").run(cwd=str(tmp_path))
    assert [Path(f).name for f in result.outputs.figures] == ["featurevis_class-control.png",
                                                              "featurevis_class-lesion.png"]
    meta = json.loads((mode_dir / "featurevis" / "featurevis_class-lesion.json").read_text())
    assert meta["Regularisers"]["jitter"] == 2 and meta["Regularisers"]["blur_every"] == 4
    text = write_group_report(out).read_text()
    assert "<h3>Feature visualisation</h3>" in text and "class-lesion: 2 Adam steps" in text
    assert "blur_every 4, blur_sigma 0.5, jitter 2" in text and "fourier_decay" not in text  # fourier is off
    assert text.count("data:image/png;base64,") == before + 2
