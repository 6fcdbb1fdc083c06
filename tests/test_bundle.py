"""Model bundles: safetensors + JSON card, round trip and clear errors."""
import json
import pickle

import pytest
import torch

from grazbids.engine import (Architecture, IntensityNormalisation, ModelBundleError, ModelBundleMissing, build_model,
                             check_bundle, load_bundle, read_card, save_bundle)


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
    with pytest.raises(ModelBundleError, match="not a safetensors file, or truncated"):
        load_bundle(path)
    (path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelBundleError, match="not valid JSON"):
        load_bundle(path)
    with pytest.raises(ModelBundleMissing, match="model card not found .the model bundle .*nowhere does not exist"):
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


# ------------------------------------------------------------------ checked before any work
def _no_weight_reading(monkeypatch):
    """check_bundle must decide from the card and the safetensors header alone."""
    from grazbids.engine import bundle

    monkeypatch.setattr(bundle, "load_file", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setattr(bundle, "build_model", _meta_only(bundle.build_model))


def _meta_only(build):
    def checked(arch):
        assert torch.get_default_device().type == "meta", "a network was allocated"
        return build(arch)
    return checked


def _header_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("kind,message", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is truncated: the header promises"),
    ("pickle", "is a Python pickle, not a safetensors file; grazbids never loads pickled weights"),
    ("zip", "is a zip archive"),
    ("padded", "bytes after the last tensor"),
    ("absurd", "needs 4,000,000,000,000 bytes but its byte range holds 16"),
    ("garbage header", "header is not JSON"),
])
def test_broken_weights_are_found_from_the_header(tmp_path, monkeypatch, kind, message):
    _, path = _saved(tmp_path)
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes({
        "empty": b"",
        "truncated": raw[:-100],
        "pickle": pickle.dumps({"weights": [1, 2, 3]}),
        "zip": b"PK\x03\x04" + b"\0" * 100,
        "padded": raw + b"\0" * 64,
        "absurd": _header_bytes({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"\0" * 16),
        "garbage header": (20).to_bytes(8, "little") + b"\xff" * 40,
    }[kind])
    _no_weight_reading(monkeypatch)
    with pytest.raises(ModelBundleError) as info:
        check_bundle(path)
    assert message in str(info.value) and str(weights) in str(info.value)


def test_card_and_weights_must_agree_before_loading(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    _no_weight_reading(monkeypatch)
    assert check_bundle(path)["classes"] == ["control", "depr"]
    card = json.loads((path / "model_card.json").read_text())
    card["architecture"]["channels"] = 5
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match=r"do not match the architecture in model_card.json: .*has shape"):
        check_bundle(path)
    # absurd channel counts: terabytes of weights, refused without allocating anything
    card["architecture"]["channels"] = 200_000
    (path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelBundleError, match=r"asks for [\d,]+ parameters"):
        check_bundle(path)


def test_missing_weights_or_card_are_missing_input(tmp_path):
    _, path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelBundleMissing, match="weights file not found"):
        check_bundle(path)
    (path / "model_card.json").unlink()
    with pytest.raises(ModelBundleMissing, match="model card not found"):
        check_bundle(path)
