"""Model bundles: safetensors + JSON card, round trip and clear errors."""
import json
import pickle

import pytest
import torch

from grazbids.engine import Architecture, IntensityNormalisation, ModelBundleError, build_model, load_bundle, read_card, save_bundle


def _card(shape=(16, 16, 16)):
    return {
        "mode": "grazplus",
        "seed": 42,
        "classes": ["control", "depr"],
        "target_column": "group",
        "input": {
            "template": "MNI152NLin2009aSym",
            "resolution": 2,
            "grid_shape": list(shape),
            "intensity_normalisation": IntensityNormalisation().to_dict(),
        },
        "training_data": {"dataset": "test", "n_per_class": {"control": 3, "depr": 5}},
    }


def _saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(Architecture((16, 16, 16), n_blocks=2, channels=4))
    return model, save_bundle(tmp_path / "model", model, _card())


def test_round_trip_gives_identical_predictions(tmp_path):
    model, path = _saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "model_card.json"]
    loaded, card = load_bundle(path)
    x = torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert card["architecture"]["n_blocks"] == 2
    assert card["grazbids_version"] and card["format"] == "grazbids-model"
    assert read_card(path)["input"]["template"] == "MNI152NLin2009aSym"


def test_missing_field(tmp_path):
    _, path = _saved(tmp_path)
    card = json.loads((path / "model_card.json").read_text())
    del card["input"]["resolution"]
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match=r"model_card.json.*input.resolution"):
        load_bundle(path)


def test_wrong_shapes(tmp_path):
    _, path = _saved(tmp_path)
    card = json.loads((path / "model_card.json").read_text())
    card["architecture"]["channels"] = 6
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match="do not match the architecture.*shape"):
        load_bundle(path)


def test_inconsistent_card(tmp_path):
    _, path = _saved(tmp_path)
    card = json.loads((path / "model_card.json").read_text())
    card["classes"] = ["a", "b", "c"]
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match="3 class labels"):
        read_card(path)


def test_corrupt_and_missing_files(tmp_path):
    _, path = _saved(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ModelBundleError, match="cannot read weights"):
        load_bundle(path)
    (path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelBundleError, match="not valid JSON"):
        load_bundle(path)
    with pytest.raises(ModelBundleError, match="model card not found"):
        load_bundle(tmp_path / "nowhere")


def test_pickled_weights_are_never_executed(tmp_path):
    _, path = _saved(tmp_path)

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (path / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelBundleError):
        load_bundle(path)
    assert not (tmp_path / "pwned").exists()


def test_saving_a_bad_card_fails_before_writing(tmp_path):
    model = build_model(Architecture((16, 16, 16), n_blocks=2, channels=4))
    card = _card()
    card["input"]["grid_shape"] = [8, 8, 8]
    with pytest.raises(ModelBundleError, match="grid_shape"):
        save_bundle(tmp_path / "model", model, card)
    assert not (tmp_path / "model").exists()
