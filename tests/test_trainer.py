"""Trainer: determinism, resume, logging, and the Graz+ effect on a shortcut task."""
import numpy as np
import pytest
import torch

from grazbids.engine import Architecture, Trainer, TrainingData, TrainSettings, masked_relevance
from engine_helpers import shortcut_task

ARCH = Architecture((16, 16, 16), n_blocks=2, channels=4)


def _data(n=24, seed=0):
    x, m, y = shortcut_task(n=n, correlation=0.9, seed=seed)
    return TrainingData(x, m, y, 2)


def _settings(**kw):
    base = dict(mode="grazplus", epochs=3, batch_size=2, accumulation_steps=2, learning_rate=1e-3, progress=False)
    return TrainSettings(**{**base, **kw})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_bit_identical_weights():
    data = _data()
    a = Trainer(ARCH, _settings()).fit(data, np.arange(16), np.arange(16, 24))
    b = Trainer(ARCH, _settings()).fit(data, np.arange(16), np.arange(16, 24))
    for k, v in _weights(a.model).items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    c = Trainer(ARCH, _settings(seed=7)).fit(data, np.arange(16), np.arange(16, 24))
    assert not torch.equal(c.model.dense[1].weight, a.model.dense[1].weight)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    data = _data()
    train, val = np.arange(16), np.arange(16, 24)
    full = Trainer(ARCH, _settings(epochs=4), tmp_path / "full").fit(data, train, val)
    # an "interrupted" run: it stopped after epoch 2, then the same command runs again
    Trainer(ARCH, _settings(epochs=2), tmp_path / "resumed").fit(data, train, val)
    resumed = Trainer(ARCH, _settings(epochs=4), tmp_path / "resumed").fit(data, train, val)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history == full.history
    assert resumed.selected_epoch == full.selected_epoch
    for k, v in _weights(full.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    np.testing.assert_array_equal(full.val_probabilities, resumed.val_probabilities)


def _assert_same_run(result, reference):
    assert result.history == reference.history and result.selected_epoch == reference.selected_epoch
    for k, v in _weights(reference.model).items():
        assert torch.equal(v, result.model.state_dict()[k]), k
    np.testing.assert_array_equal(reference.val_probabilities, result.val_probabilities)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_checkpoint_is_discarded_and_the_previous_one_resumed(tmp_path, caplog, damage):
    data = _data()
    train, val = np.arange(16), np.arange(16, 24)
    full = Trainer(ARCH, _settings(epochs=4), tmp_path / "full").fit(data, train, val)
    work = tmp_path / "resumed"
    Trainer(ARCH, _settings(epochs=3), work).fit(data, train, val)
    checkpoint = work / "checkpoint.safetensors"
    assert (work / "checkpoint.prev.safetensors").exists()  # epoch 2, kept as the fallback
    raw = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x80\x04junk" * 50}[damage])
    with caplog.at_level("INFO", logger="grazbids"):
        resumed = Trainer(ARCH, _settings(epochs=4), work).fit(data, train, val)
    assert "checkpoint.safetensors is unreadable" in caplog.text and "moved aside" in caplog.text
    assert "resuming after epoch 2 of 4 from" in caplog.text and "checkpoint.prev.safetensors" in caplog.text
    assert (work / "checkpoint.safetensors.broken").exists()
    _assert_same_run(resumed, full)
    # the damaged file is never read again: the next run resumes from the new checkpoint
    caplog.clear()
    with caplog.at_level("INFO", logger="grazbids"):
        Trainer(ARCH, _settings(epochs=4), work).fit(data, train, val)
    assert "resuming after epoch 4 of 4" in caplog.text and "unreadable" not in caplog.text


def test_damaged_selected_weights_are_not_silently_used(tmp_path, caplog):
    data = _data()
    train, val = np.arange(16), np.arange(16, 24)
    full = Trainer(ARCH, _settings(epochs=3), tmp_path / "full").fit(data, train, val)
    work = tmp_path / "resumed"
    Trainer(ARCH, _settings(epochs=3), work).fit(data, train, val)
    for name in ("selected.safetensors", "selected.prev.safetensors"):
        if (work / name).exists():
            (work / name).write_bytes((work / name).read_bytes()[:100])
    with caplog.at_level("INFO", logger="grazbids"):
        again = Trainer(ARCH, _settings(epochs=3), work).fit(data, train, val)
    assert "selected-epoch weights" in caplog.text and "training starts from epoch 1" in caplog.text
    _assert_same_run(again, full)


def test_checkpoint_with_other_settings_is_not_reused(tmp_path, caplog):
    data = _data()
    Trainer(ARCH, _settings(epochs=1), tmp_path).fit(data, np.arange(16), np.arange(16, 24))
    with caplog.at_level("WARNING"):
        result = Trainer(ARCH, _settings(epochs=1, learning_rate=5e-4), tmp_path).fit(data, np.arange(16), np.arange(16, 24))
    assert "other settings" in caplog.text
    assert len(result.history) == 1


def test_log_checkpoint_and_constraints(tmp_path):
    data = _data()
    result = Trainer(ARCH, _settings(mode="plain", epochs=2), tmp_path).fit(data, np.arange(16), np.arange(16, 24))
    lines = (tmp_path / "history.tsv").read_text().splitlines()
    assert lines[0].split("\t") == [
        "epoch", "train_loss", "train_ce", "train_relevance_inside", "train_balanced_accuracy",
        "val_loss", "val_ce", "val_relevance_inside", "val_balanced_accuracy",
    ]
    assert len(lines) == 3
    assert (tmp_path / "checkpoint.safetensors").exists()
    for layer in result.model.lrp_layers():
        assert (layer.bias <= 0).all()
    assert result.val_probabilities.shape == (8, 2)
    np.testing.assert_allclose(result.val_probabilities.sum(1), 1, rtol=1e-5)


def test_selected_epoch_rule():
    from grazbids.engine.trainer import _is_better

    assert _is_better((0.8, 0.5), (0.7, 0.9))
    assert _is_better((0.8, 0.9), (0.8, 0.5)), "relevance breaks accuracy ties"
    assert _is_better((0.8, 0.5), (0.8, 0.5)), "full ties go to the later epoch"
    assert not _is_better((0.7, 1.0), (0.8, 0.1))


def test_grazplus_moves_relevance_into_the_mask():
    """Label = blob inside the mask; a background block agrees with the label in training."""
    x, m, y = shortcut_task(n=48, correlation=1.0, seed=0)
    xt, mt, yt = shortcut_task(n=24, correlation=0.5, seed=1)
    data = TrainingData(torch.cat([x, xt]), torch.cat([m, mt]), torch.cat([y, yt]), 2)
    fraction = {}
    for mode in ("plain", "grazplus"):
        settings = _settings(mode=mode, epochs=20, batch_size=4, accumulation_steps=1)
        model = Trainer(ARCH, settings).fit(data, np.arange(48), np.arange(48, 72)).model
        with torch.no_grad():
            _, inside, total = masked_relevance(model, xt, mt)
        fraction[mode] = float((inside / total).mean())
    assert fraction["grazplus"] > 0.98
    assert (1 - fraction["grazplus"]) < 0.5 * (1 - fraction["plain"]), fraction


def test_training_data_checks():
    x = torch.rand(2, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="non-negative"):
        TrainingData(x - 1, torch.ones_like(x), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"must be \(N, 1 or 2, D, H, W\)"):
        TrainingData(x, torch.ones(2, 1, 4, 4, 5), torch.tensor([0, 1]), 2)


def test_guidance_mask_moves_relevance_into_the_lesion():
    """Mask guidance with a lesion-region mask (Sefcik & Benesova; additive and ratio loss)
    puts more held-out relevance into the lesion region than brain-mask Graz+ does."""
    x, m, y = shortcut_task(n=32, correlation=0.5, seed=0)
    lesion = torch.zeros_like(m)
    lesion[:, :, 5:10, 5:10, 7:12] = 1  # the region where patients' blob sits (shortcut_task)
    data = TrainingData(x, torch.cat([m, lesion], 1), y, 2)
    brain_only = TrainingData(x, m, y, 2)
    train, held_out = np.arange(24), np.arange(24, 32)
    share = {}
    for name, d, loss in (("brain", brain_only, "additive"), ("additive", data, "additive"), ("ratio", data, "ratio")):
        settings = _settings(epochs=8, batch_size=4, accumulation_steps=1, guidance_loss=loss)
        model = Trainer(ARCH, settings).fit(d, train, held_out).model
        with torch.no_grad():
            _, inside, total = masked_relevance(model, x[held_out], lesion[held_out])
        share[name] = float((inside / total).mean())
    assert share["additive"] > share["brain"] + 0.05, share
    assert share["ratio"] > share["brain"] + 0.05, share


def test_output_collapsed_detects_constant_predictions():
    from grazbids.engine.trainer import output_collapsed
    assert output_collapsed(np.tile([[0.3, 0.7]], (5, 1)))
    assert not output_collapsed(np.array([[0.3, 0.7], [0.31, 0.69]]))
    assert not output_collapsed(np.array([[0.3, 0.7]]))  # one input says nothing


def test_training_stops_with_a_warning_when_the_network_dies(monkeypatch, caplog):
    from grazbids.engine import trainer as trainer_module
    build = trainer_module.build_model

    def dead_model(arch):  # the first block's ReLUs are off for every input: output = last bias
        model = build(arch)
        with torch.no_grad():
            next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d)).bias.fill_(-1e3)
        return model

    monkeypatch.setattr(trainer_module, "build_model", dead_model)
    with caplog.at_level("WARNING", logger="grazbids.engine"):
        result = Trainer(ARCH, _settings(epochs=5)).fit(_data(), np.arange(16), np.arange(16, 24))
    assert result.collapsed_epoch == 1
    assert len(result.history) == 1
    assert "same prediction" in caplog.text and "--learning-rate" in caplog.text
    without_validation = Trainer(ARCH, _settings(epochs=5)).fit(_data(), np.arange(16))  # probes training inputs
    assert without_validation.collapsed_epoch == 1 and len(without_validation.history) == 1


def test_a_healthy_network_is_not_reported_dead():
    result = Trainer(ARCH, _settings(epochs=2)).fit(_data(), np.arange(16), np.arange(16, 24))
    assert result.collapsed_epoch is None and len(result.history) == 2


def test_warmup_scales_the_learning_rate_per_epoch_and_resumes(tmp_path):
    from grazbids.engine.trainer import warmup_learning_rate

    assert [warmup_learning_rate(1e-3, 4, e) for e in range(1, 6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert warmup_learning_rate(1e-3, 0, 1) == 1e-3
    # checkpoints written before the option still resume; a warm-up is another run
    index = np.arange(4)
    assert _settings().fingerprint(index) == _settings(warmup_epochs=0).fingerprint(index)
    assert _settings().fingerprint(index) != _settings(warmup_epochs=2).fingerprint(index)
    data = _data()
    train, val = np.arange(16), np.arange(16, 24)
    # epoch 1 of a 2-epoch warm-up trains exactly as a run at half the learning rate
    warm = Trainer(ARCH, _settings(epochs=1, warmup_epochs=2)).fit(data, train, val)
    half = Trainer(ARCH, _settings(epochs=1, learning_rate=5e-4)).fit(data, train, val)
    for k, v in _weights(half.model).items():
        assert torch.equal(v, warm.model.state_dict()[k]), k
    # and an interrupted warm-up resumes to the uninterrupted result
    full = Trainer(ARCH, _settings(epochs=3, warmup_epochs=2), tmp_path / "full").fit(data, train, val)
    Trainer(ARCH, _settings(epochs=1, warmup_epochs=2), tmp_path / "resumed").fit(data, train, val)
    resumed = Trainer(ARCH, _settings(epochs=3, warmup_epochs=2), tmp_path / "resumed").fit(data, train, val)
    _assert_same_run(resumed, full)
