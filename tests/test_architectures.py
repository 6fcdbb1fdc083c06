"""The Kondrateva-style architecture: shapes, bundles, training modes, backward compatibility."""
import json

import numpy as np
import pytest
import torch

from grazbids.engine import (Architecture, GrazPlusNet, KondratevaNet, Trainer, TrainingData, TrainSettings,
                             build_model, kondrateva_architecture, load_bundle, save_bundle, zplus_heatmap)
from engine_helpers import shortcut_task
from explain_helpers import tiny_kondrateva
from test_bundle import _card


def test_paper_configuration_shapes():
    model = build_model(kondrateva_architecture((58, 70, 58)))
    assert isinstance(model, KondratevaNet)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules()) == 3
    assert model.feature_shape == (128, 7, 8, 7)
    assert model.eval()(torch.rand(1, 1, 58, 70, 58)).shape == (1, 2)
    deeper = build_model(Architecture((16, 16, 16), n_classes=3, channels=2, n_blocks=2, dense_units=6, name="kondrateva"))
    assert [m.out_features for m in deeper.modules() if isinstance(m, torch.nn.Linear)] == [6, 3]


def test_bad_architectures():
    with pytest.raises(ValueError, match="too small for 3 max-pooling blocks"):
        build_model(kondrateva_architecture((20, 6, 20)))
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*grazplus, kondrateva"):
        build_model(Architecture((8, 8, 8), name="resnet"))


def test_kondrateva_bundle_round_trip(tmp_path):
    model = tiny_kondrateva(shape=(16, 16, 16), n_classes=2).float()
    path = save_bundle(tmp_path / "model", model, _card())
    loaded, card = load_bundle(path)
    assert isinstance(loaded, KondratevaNet) and card["architecture"]["name"] == "kondrateva"
    assert not loaded.training
    x = torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(loaded(x), model(x)), "batch-norm statistics travel with the weights"


def test_cards_without_a_name_load_as_grazplus(tmp_path):
    model = build_model(Architecture((16, 16, 16), n_blocks=2, channels=4))
    path = save_bundle(tmp_path / "model", model, _card())
    card = json.loads((path / "model_card.json").read_text())
    del card["architecture"]["name"]  # as written before architectures had names
    (path / "model_card.json").write_text(json.dumps(card))
    loaded, _ = load_bundle(path)
    assert isinstance(loaded, GrazPlusNet)


def _data():
    x, m, y = shortcut_task(n=8, size=16, seed=0)
    return TrainingData(x, m, y, 2)


def test_grazplus_mode_is_refused_for_kondrateva():
    arch = Architecture((16, 16, 16), channels=2, n_blocks=2, name="kondrateva")
    with pytest.raises(ValueError, match="'grazplus' needs the 'grazplus' architecture"):
        Trainer(arch, TrainSettings(mode="grazplus", progress=False))
    with pytest.raises(TypeError, match="use grazbids.explain"):
        zplus_heatmap(build_model(arch), torch.rand(1, 1, 16, 16, 16))


def test_kondrateva_trains_in_plain_mode_with_positive_biases_allowed():
    arch = Architecture((16, 16, 16), channels=2, n_blocks=2, name="kondrateva")
    settings = TrainSettings(mode="masked", epochs=2, batch_size=2, accumulation_steps=1, learning_rate=1e-2, progress=False)
    result = Trainer(arch, settings).fit(_data(), np.arange(6), np.arange(6, 8))
    assert isinstance(result.model, KondratevaNet) and len(result.history) == 2
    assert np.isnan(result.history[-1]["train_relevance_inside"]), "relevance is tracked for grazplus only"
    assert np.isfinite(result.history[-1]["train_loss"])
    assert any((m.bias > 0).any() for m in result.model.modules() if isinstance(m, torch.nn.Conv3d)), \
        "no bias projection for this architecture"
    untrained = build_model(arch)
    assert not torch.equal(result.model.features[1].running_mean, untrained.features[1].running_mean)
