"""Group-level training on a tiny synthetic preprocessed cohort, then inference."""
import json

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from grazbids.engine import load_bundle
from grazbids.config import GroupSettings
from grazbids.group.cohort import GroupInputError
from grazbids.group.training import run_group_training, train_settings
from grazbids.engine.inference import predict

TPL, RES = "MNI152NLin2009aSym", 2


def _cohort(tmp_path, n=8, shape=(16, 16, 16), references=False):
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    rng = np.random.default_rng(0)
    rows = []
    mask = np.zeros(shape, np.float32)
    mask[4:12, 4:12, 4:12] = 1
    for i in range(n):
        label = "m" if i % 2 else "f"
        rows.append({"participant_id": f"sub-{i:02d}", "gender": label if i != n - 1 else "n/a"})
        image = mask * rng.uniform(300, 500, shape)
        if label == "m":
            image[7:10, 7:10, 7:10] = 900
        anat = out / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        stem = f"sub-{i:02d}_space-{TPL}_res-{RES}"
        nb.save(nb.Nifti1Image(image.astype(np.float32), np.eye(4)), str(anat / f"{stem}_desc-preproc_T1w.nii.gz"))
        nb.save(nb.Nifti1Image(mask.astype(np.uint8), np.eye(4)), str(anat / f"{stem}_desc-brain_mask.nii.gz"))
        if references:  # tissue maps beside the image; effect/shortcut masks as input derivatives
            for tissue, share in (("GM", 0.5), ("WM", 0.3), ("CSF", 0.2)):
                nb.save(nb.Nifti1Image(mask * share, np.eye(4)), str(anat / f"{stem}_label-{tissue}_probseg.nii.gz"))
            sim = bids / "derivatives" / "simulation" / f"sub-{i:02d}" / "anat"
            sim.mkdir(parents=True)
            effect = np.zeros(shape, np.uint8)
            if label == "m":
                effect[7:10, 7:10, 7:10] = 1
            shortcut = np.zeros(shape, np.uint8)
            shortcut[0:2, 0:2, 0:2] = 1
            nb.save(nb.Nifti1Image(effect, np.eye(4)), str(sim / f"{stem}_desc-effect_mask.nii.gz"))
            nb.save(nb.Nifti1Image(shortcut, np.eye(4)), str(sim / f"{stem}_desc-shortcut_mask.nii.gz"))
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)
    return bids, out, [f"{i:02d}" for i in range(n)]


def _run(bids, out, participants, tmp_path, **kw):
    args = dict(bids_dir=bids, output_dir=out, participants=participants, target_column="gender", modes=["grazplus"],
                cv_folds=2, epochs=2, seed=1, device="cpu", template=TPL, resolution=RES)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in {**args, **kw}.items()}
    return run_group_training(GroupSettings(**args), tmp_path / "work")


def test_group_training_writes_cv_outputs_and_a_usable_bundle(tmp_path):
    bids, out, participants = _cohort(tmp_path, references=True)
    summary = _run(bids, out, participants, tmp_path, modes=["plain", "grazplus"],
                   training_options={"learning_rate": 1e-3, "accumulation_steps": 2})
    assert set(summary) == {"plain", "grazplus"}
    mode_dir = out / "group" / "mode-grazplus"
    folds = pd.read_csv(mode_dir / "cv_metrics.tsv", sep="\t")
    assert folds["fold"].tolist() == [1, 2] and folds["n_validation"].sum() == 7  # sub-07 has n/a
    oof = pd.read_csv(mode_dir / "oof_predictions.tsv", sep="\t")
    assert sorted(oof["participant_id"]) == [f"sub-{i:02d}" for i in range(7)]
    np.testing.assert_allclose(oof[["probability_f", "probability_m"]].sum(axis=1), 1, rtol=1e-5)
    for fold in (1, 2):  # never the same participant in training and validation
        assert set(oof[oof.fold == fold].participant_id).isdisjoint(oof[oof.fold != fold].participant_id)
    cv = json.loads((mode_dir / "cv_metrics.json").read_text())
    assert cv["classes"] == ["f", "m"]
    assert np.isclose(cv["last_epoch_balanced_accuracy_mean"], folds["last_epoch_balanced_accuracy"].mean())
    assert folds["collapsed_epoch"].isna().all() and cv["final_model_collapsed_epoch"] is None  # alive
    for cls in ("f", "m"):
        heat = nb.load(str(mode_dir / f"tpl-{TPL}_res-{RES}_class-{cls}_desc-meanzplus_heatmap.nii.gz"))
        assert heat.shape == (16, 16, 16) and np.isclose(heat.get_fdata().sum(), 1, rtol=1e-3)
    assert (mode_dir / "history" / "fold-1_history.tsv").exists()
    metrics = pd.read_csv(mode_dir / "explanation_metrics.tsv", sep="\t")
    assert metrics["participant_id"].tolist() == oof["participant_id"].tolist()
    shares = metrics[["relevance_gm", "relevance_wm", "relevance_csf", "relevance_outside_brain"]].sum(axis=1)
    np.testing.assert_allclose(shares, 1, atol=1e-6)  # the tissue shares partition the relevance
    np.testing.assert_allclose(metrics["relevance_inside_brain"] + metrics["relevance_outside_brain"], 1, atol=1e-6)
    assert metrics.loc[metrics.true_label == "f", "relevance_inside_effect"].isna().all()  # no effect in controls
    assert metrics.loc[metrics.true_label == "m", "roc_auc_effect"].between(0, 1).all()
    assert metrics["relevance_inside_shortcut"].between(0, 1).all()
    explained = json.loads((mode_dir / "explanation_summary.json").read_text())
    assert explained["n_samples"] == 7
    assert np.isclose(explained["mean"]["relevance_gm"], metrics["relevance_gm"].mean())
    assert set(explained["mean_per_true_class"]) == {"f", "m"}
    modes = pd.read_csv(out / "group" / "modes_summary.tsv", sep="\t")
    assert modes["mode"].tolist() == ["plain", "grazplus"]
    assert np.isclose(modes.loc[1, "relevance_inside_brain"], metrics["relevance_inside_brain"].mean())
    model, card = load_bundle(mode_dir / "model")
    assert card["target_column"] == "gender" and card["training_data"]["n_per_class"] == {"f": 4, "m": 3}
    assert card["training"]["learning_rate"] == 1e-3 and card["training"]["accumulation_steps"] == 2
    assert card["training"]["outside_penalty"] == "invariance"  # Graz+ as shipped (docs/simulation.md)
    plain_card = load_bundle(out / "group" / "mode-plain" / "model")[1]
    assert plain_card["training"]["outside_penalty"] == "none"  # the baseline stays plain
    image = out / "sub-00" / "anat" / f"sub-00_space-{TPL}_res-{RES}_desc-preproc_T1w.nii.gz"
    result = predict(mode_dir / "model", image, str(image).replace("desc-preproc_T1w", "desc-brain_mask"), "cpu")
    assert np.isclose(result.probabilities.sum(), 1) and result.predicted in ("f", "m")
    assert result.heatmap.shape == (16, 16, 16) and np.isclose(result.heatmap.sum(), 1, rtol=1e-3)
    # decision dependence: per held-out participant, and the flip rates in the CV summary
    for region in ("outside", "shortcut"):
        for fill in ("zero", "mean"):
            assert metrics[f"flip_{region}_{fill}"].isin([0.0, 1.0]).all()
            assert metrics[f"prob_change_{region}_{fill}"].between(-1, 1).all()
            assert np.isclose(cv["flip_rates"][f"{region}_{fill}"], metrics[f"flip_{region}_{fill}"].mean())
    assert metrics.loc[metrics.true_label == "f", "flip_effect_zero"].isna().all()  # no effect to replace
    assert "flip_outside_zero" in modes.columns and 0 <= cv["chance"]["p_value"] <= 1
    assert set(result.dependence) == {"outside_zero", "outside_mean"}  # the bundle carries its mean image


def test_outside_penalty_defaults_per_mode_and_an_explicit_choice_wins(tmp_path):
    base = dict(bids_dir=tmp_path, output_dir=tmp_path, participants=("01",), target_column="gender")
    assert train_settings(GroupSettings(**base), "grazplus", 1).outside_penalty == "invariance"
    assert train_settings(GroupSettings(**base), "plain", 1).outside_penalty == "none"
    assert train_settings(GroupSettings(**base), "masked", 1).outside_penalty == "none"
    paper = GroupSettings(**base, training_options={"outside_penalty": "none"})
    assert train_settings(paper, "grazplus", 1).outside_penalty == "none"


def test_group_input_errors(tmp_path):
    bids, out, participants = _cohort(tmp_path, n=6)
    with pytest.raises(GroupInputError, match="no column 'diagnosis'"):
        _run(bids, out, participants, tmp_path, target_column="diagnosis")
    with pytest.raises(GroupInputError, match="only one class"):
        _run(bids, out, ["00", "02", "04"], tmp_path)
    with pytest.raises(GroupInputError, match="fold 1 would train without any participant of class"):
        _run(bids, out, ["00", "01"], tmp_path)
    with pytest.raises(GroupInputError, match="need at least --cv-folds=6"):
        _run(bids, out, participants, tmp_path, cv_folds=6)


def test_rerun_resumes_from_the_checkpoints_of_the_same_cohort(tmp_path):
    """Finished folds are not retrained; another cohort gets its own checkpoint folder."""
    bids, out, participants = _cohort(tmp_path, n=6)
    first = _run(bids, out, participants, tmp_path, epochs=1)
    checkpoints = sorted((tmp_path / "work").glob("cohort-*/mode-grazplus/*/checkpoint.safetensors"))
    assert len(checkpoints) == 3  # two folds and the final model
    stamps = [c.stat().st_mtime_ns for c in checkpoints]
    second = _run(bids, out, participants, tmp_path, epochs=1)
    assert [c.stat().st_mtime_ns for c in checkpoints] == stamps  # nothing retrained
    assert second["grazplus"]["per_fold"] == first["grazplus"]["per_fold"]
    _run(bids, out, participants[1:], tmp_path, epochs=1)
    assert len(list((tmp_path / "work").glob("cohort-*"))) == 2


def test_guidance_mask_from_the_input_derivatives(tmp_path):
    bids, out, participants = _cohort(tmp_path, n=6, references=True)
    _run(bids, out, participants, tmp_path, epochs=1, guidance_mask="desc-effect",
         training_options={"guidance_loss": "ratio"})
    _, card = load_bundle(out / "group" / "mode-grazplus" / "model")
    assert card["input"]["guidance_mask"] == "desc-effect" and card["training"]["guidance_loss"] == "ratio"
    with pytest.raises(GroupInputError, match="no guidance mask .*desc-lesion_mask"):
        _run(bids, out, participants, tmp_path, epochs=1, guidance_mask="desc-lesion")
    with pytest.raises(GroupInputError, match="use desc-<label>"):
        _run(bids, out, participants, tmp_path, epochs=1, guidance_mask="lesion")


def test_kondrateva_architecture_trains_and_predicts(tmp_path):
    bids, out, participants = _cohort(tmp_path, n=6)
    summary = _run(bids, out, participants, tmp_path, epochs=1, modes=["plain"], architecture="kondrateva")
    assert 0 <= summary["plain"]["balanced_accuracy_mean"] <= 1
    mode_dir = out / "group" / "mode-plain"
    model, card = load_bundle(mode_dir / "model")
    assert type(model).__name__ == "KondratevaNet"
    metrics = pd.read_csv(mode_dir / "explanation_metrics.tsv", sep="\t")
    assert metrics["relevance_inside_brain"].between(0, 1).all()  # z+ through grazbids.explain
    image = out / "sub-00" / "anat" / f"sub-00_space-{TPL}_res-{RES}_desc-preproc_T1w.nii.gz"
    result = predict(mode_dir / "model", image, str(image).replace("desc-preproc_T1w", "desc-brain_mask"), "cpu")
    assert np.isclose(result.probabilities.sum(), 1) and np.isfinite(result.heatmap).all()


def test_out_of_fold_explanations_and_atlas_regions(tmp_path):
    bids, out, participants = _cohort(tmp_path, references=True)
    labels = np.zeros((16, 16, 16), np.int16)
    labels[4:8] = 1
    labels[8:12] = 2
    atlas = tmp_path / "atlas_dseg.nii.gz"
    nb.save(nb.Nifti1Image(labels, np.eye(4)), str(atlas))
    (tmp_path / "atlas_dseg.tsv").write_text("index\tname\n1\tleft\n2\tright\n")
    _run(bids, out, participants, tmp_path, explain=("gradient", "gradcam"), atlas=atlas,
         training_options={"learning_rate": 1e-3})
    mode_dir = out / "group" / "mode-grazplus"
    oof = pd.read_csv(mode_dir / "oof_predictions.tsv", sep="\t")
    for folder, desc in ((mode_dir, "zplus"), (mode_dir / "explain-gradient", "gradient"),
                         (mode_dir / "explain-gradcam", "gradcam")):
        metrics = pd.read_csv(folder / "explanation_metrics.tsv", sep="\t")
        assert metrics["participant_id"].tolist() == oof["participant_id"].tolist()
        assert metrics["relevance_inside_brain"].between(0, 1).all()
        summary = json.loads((folder / "explanation_summary.json").read_text())
        assert summary["method"] == desc and summary["n_samples"] == 7
        for cls in ("f", "m"):
            assert nb.load(str(folder / f"tpl-{TPL}_res-{RES}_class-{cls}_desc-mean{desc}_heatmap.nii.gz")).shape == (16,) * 3
        regions = pd.read_csv(folder / "regions.tsv", sep="\t")
        shares = regions[["left", "right", "outside_atlas"]]
        np.testing.assert_allclose(shares.sum(axis=1), 1, atol=1e-6)  # the regions partition the relevance
        ranked = pd.read_csv(folder / "regions_summary.tsv", sep="\t")
        assert set(ranked["region"]) == {"left", "right", "outside_atlas"}
        assert ranked["mean_relevance_fraction"].is_monotonic_decreasing
    # the gradient methods' maps differ from the z+ ones (not a copy)
    zplus = nb.load(str(mode_dir / f"tpl-{TPL}_res-{RES}_class-m_desc-meanzplus_heatmap.nii.gz")).get_fdata()
    gradient = nb.load(str(mode_dir / "explain-gradient" / f"tpl-{TPL}_res-{RES}_class-m_desc-meangradient_heatmap.nii.gz")).get_fdata()
    assert not np.allclose(zplus, gradient)


def test_group_explain_target_and_atlas_are_checked_before_training(tmp_path):
    bids, out, participants = _cohort(tmp_path)
    with pytest.raises(GroupInputError, match="--explain-target 'x'"):
        _run(bids, out, participants, tmp_path, explain=("gradient",), explain_target="x")
    atlas = tmp_path / "empty.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((16, 16, 16), np.int16), np.eye(4)), str(atlas))
    with pytest.raises(GroupInputError, match="no labelled region"):
        _run(bids, out, participants, tmp_path, atlas=atlas)
    assert not (out / "group").exists()
