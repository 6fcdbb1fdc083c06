"""Group level: Graz+ training with participant-wise cross-validation on preprocessed data.

For each mode: k-fold CV split by participant (metrics, out-of-fold predictions and
out-of-fold heat maps), then a final model trained on every participant for the median
of the epochs the folds selected; it is written as a model bundle whose card records
the CV scores. Everything comes from one :class:`grazbids.config.GroupSettings`; the
outputs go where :mod:`grazbids.group.layout` says.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..config import GroupSettings
from ..engine import (
    Architecture, CohortCache, Trainer, TrainingData, TrainSettings, balanced_accuracy, kondrateva_architecture,
    mean_image, model_input,
    participant_folds, save_bundle,
)
from ..engine.inference import MEAN_IMAGE_NAME, zplus_map
from ..engine.trainer import distributed_rank_and_size
from ..evaluate.atlas import Atlas, AtlasError, load_atlas
from ..explain import explain as explain_map
from ..explain.dependence import FLIP_RATE_ADVICE, FLIP_RATE_WARNING, NEAR_CHANCE_ADVICE
from ..explain.targets import method_desc, resolve_target
from ..utils.atomic import atomic_path, write_json, write_text, write_tsv
from .dependence import fold_dependence, flip_rates
from .cohort import (
    NORMALISATION, GroupInputError, Sample, cohort_key, find_guidance_masks, find_samples, load_cohort, read_targets,
)
from .layout import GroupLayout, ModeLayout, safe_label
from .oof_maps import OutOfFoldMaps

LOG = logging.getLogger("grazbids.group")


@dataclass
class Cohort:
    """The loaded training data of one group run, shared by every mode."""

    samples: list[Sample]
    data: TrainingData | CohortCache  # streamed from disk in group runs (grazbids.engine.cohort_cache)
    classes: list[str]
    affine: np.ndarray
    atlas: Atlas | None
    dataset_name: str
    key: str  # names the checkpoint folder (grazbids.group.cohort.cohort_key)

    @property
    def participants(self) -> list[str]:
        return [s.participant for s in self.samples]


@dataclass
class CrossValidation:
    """What the folds of one mode produced (out-of-fold: each sample by the model that did not see it)."""

    fold_rows: list[dict]  # one per fold (cv_metrics.tsv)
    probabilities: np.ndarray  # (samples, classes)
    fold_of: np.ndarray  # fold in which each sample was held out
    inside: np.ndarray  # fraction of z+ relevance inside the brain mask
    maps: dict[str, OutOfFoldMaps]  # z+ and every --explain method

    @property
    def folds(self) -> pd.DataFrame:
        return pd.DataFrame(self.fold_rows)


def is_main_process() -> bool:
    """Under torchrun every process trains; only rank 0 writes the shared outputs."""
    return distributed_rank_and_size()[0] == 0


def architecture_for(settings: GroupSettings, shape: tuple[int, ...], n_classes: int) -> Architecture:
    if settings.architecture == "kondrateva":
        return kondrateva_architecture(shape, n_classes)
    return Architecture(shape, n_classes=n_classes)


# Graz+ as grazbids ships it: the z+ term of the paper plus the invariance penalty, the only
# variant that learned the lesion instead of an outside-the-brain shortcut in every run of the
# shortcut benchmark (docs/simulation.md, "A cohort where plain follows the shortcut");
# --outside-penalty none gives the paper's Graz+.
DEFAULT_OUTSIDE_PENALTY = {"grazplus": "invariance"}


def train_settings(settings: GroupSettings, mode: str, epochs: int) -> TrainSettings:
    options = dict(settings.training_options)
    options.setdefault("outside_penalty", DEFAULT_OUTSIDE_PENALTY.get(mode, "none"))
    return TrainSettings(mode=mode, epochs=epochs, seed=settings.seed, device=settings.device, **options)


def load_group_cohort(settings: GroupSettings, work_dir: Path | None = None) -> Cohort:
    """Samples, labels and images of the run; every input problem is raised here, before training.
    With ``work_dir`` the images stream from a cohort cache in ``work_dir/cohort-<key>/data``."""
    targets = read_targets(settings.bids_dir, settings.target_column)
    samples = find_samples(settings.output_dir, list(settings.participants), targets, settings.template,
                           settings.resolution, settings.target_column, settings.bids_dir)
    n_participants = len({s.participant for s in samples})
    if n_participants < settings.cv_folds:
        raise GroupInputError(
            f"only {n_participants} participants with preprocessed data and a {settings.target_column!r} "
            f"value; need at least --cv-folds={settings.cv_folds}"
        )
    guidance = find_guidance_masks(samples, settings.guidance_mask, bids_dir=settings.bids_dir,
                                   output_dir=settings.output_dir, template=settings.template,
                                   resolution=settings.resolution) if settings.guidance_mask else None
    key = cohort_key(samples, settings.cv_folds, settings.template, settings.resolution, guidance)
    # the cache holds the network's input, which --input-image decides
    cache_dir = Path(work_dir) / f"cohort-{key}" / f"data-{settings.input_image}" if work_dir is not None else None
    data, classes, affine = load_cohort(samples, guidance, settings.input_image, cache_dir)
    try:  # checked before hours of training, not after
        resolve_target(settings.explain_target, classes)
        atlas = load_atlas(settings.atlas, nb.load(str(samples[0].image))) if settings.atlas else None
    except (ValueError, AtlasError) as err:
        raise GroupInputError(str(err)) from None
    counts = {c: int((data.labels.numpy() == j).sum()) for j, c in enumerate(classes)}
    LOG.info("group level: %d samples from %d participants, %s = %s", len(samples), n_participants,
             settings.target_column, counts)
    try:
        dataset_name = json.loads((settings.bids_dir / "dataset_description.json").read_text()).get("Name", "")
    except (OSError, json.JSONDecodeError):
        dataset_name = ""
    return Cohort(samples, data, classes, affine, atlas, dataset_name, key)


def _check_folds(folds, cohort: Cohort, cv_folds: int) -> None:
    for k, (train, _) in enumerate(folds, start=1):
        missing = set(range(len(cohort.classes))) - set(cohort.data.labels[train].tolist())
        if missing:
            raise GroupInputError(
                f"with {cv_folds} folds, fold {k} would train without any participant of class "
                f"{', '.join(repr(cohort.classes[c]) for c in sorted(missing))}; use fewer --cv-folds or more participants"
            )


def cross_validate(settings: GroupSettings, mode: str, cohort: Cohort, arch: Architecture, work_dir: Path,
                   layout: ModeLayout) -> CrossValidation:
    data, classes, participants = cohort.data, cohort.classes, cohort.participants
    folds = participant_folds(participants, data.labels.numpy(), settings.cv_folds, settings.seed)
    _check_folds(folds, cohort, settings.cv_folds)
    n = len(cohort.samples)
    probabilities = np.full((n, len(classes)), np.nan)
    fold_of = np.zeros(n, dtype=int)
    inside = np.full(n, np.nan)
    maps = {method: OutOfFoldMaps(method, cohort.samples, classes, arch.input_shape, cohort.atlas)
            for method in ("zplus", *settings.explain)}
    target = resolve_target(settings.explain_target, classes)
    rows = []
    for k, (train, val) in enumerate(folds, start=1):
        LOG.info("mode %s: fold %d/%d (%d train, %d validation participants)", mode, k, settings.cv_folds,
                 len({participants[i] for i in train}), len({participants[i] for i in val}))
        result = Trainer(arch, train_settings(settings, mode, settings.epochs), work_dir / f"fold-{k}",
                         name=f"{mode} fold {k}/{settings.cv_folds}").fit(data, train, val)
        probabilities[val] = result.val_probabilities
        fold_of[val] = k
        x = model_input(data.images[val], data.masks[val], mode)
        brain = data.masks[val, 0].numpy()
        with torch.inference_mode():
            relevance, _ = zplus_map(result.model, x)
        relevance = relevance[:, 0].numpy()
        inside[val] = (relevance * brain).sum(axis=(1, 2, 3)) / np.maximum(relevance.sum(axis=(1, 2, 3)), 1e-12)
        # does the decision change when the outside of the brain (or a known region) is replaced?
        dependence = fold_dependence(result.model, data.images[val], data.masks[val], mode,
                                     mean_image(data, train),
                                     [cohort.samples[i].references for i in val])
        for j, i in enumerate(val):
            maps["zplus"].add(i, relevance[j], brain[j], extra=dependence[j])
        for method in settings.explain:
            LOG.info("mode %s: fold %d/%d: out-of-fold %s maps", mode, k, settings.cv_folds, method)
            for j, i in enumerate(val):
                maps[method].add(i, explain_map(result.model, x[j:j + 1], method, target=target)[0, 0].numpy(), brain[j])
        y_val = data.labels[val].numpy()
        predicted = result.val_probabilities.argmax(1)
        rows.append({
            "fold": k, "n_train": len(train), "n_validation": len(val), "selected_epoch": result.selected_epoch,
            "balanced_accuracy": balanced_accuracy(y_val, predicted, len(classes)),
            "accuracy": float(np.mean(predicted == y_val)),
            "relevance_inside_mask": float(np.mean(inside[val])),
            # the selected epoch was chosen on this same fold (optimistic); the last epoch was not
            "last_epoch_balanced_accuracy": float(result.history[-1]["val_balanced_accuracy"]),
            # training stopped here: the output no longer depended on the input (dead ReLUs)
            "collapsed_epoch": result.collapsed_epoch,
        })
        if is_main_process():
            write_text(layout.fold_history(k), (work_dir / f"fold-{k}" / "history.tsv").read_text())
    return CrossValidation(rows, probabilities, fold_of, inside, maps)


def cv_summary(settings: GroupSettings, mode: str, cohort: Cohort, cv: CrossValidation) -> dict:
    ba = cv.folds["balanced_accuracy"].to_numpy()
    last = cv.folds["last_epoch_balanced_accuracy"].to_numpy()
    return {
        "mode": mode, "folds": settings.cv_folds, "target_column": settings.target_column, "classes": cohort.classes,
        "balanced_accuracy_mean": float(ba.mean()), "balanced_accuracy_sd": float(ba.std(ddof=1)) if len(ba) > 1 else 0.0,
        "balanced_accuracy_min": float(ba.min()), "balanced_accuracy_max": float(ba.max()),
        "pooled_oof_balanced_accuracy": balanced_accuracy(cohort.data.labels.numpy(), cv.probabilities.argmax(1),
                                                          len(cohort.classes)),
        "last_epoch_balanced_accuracy_mean": float(last.mean()),
        "last_epoch_balanced_accuracy_sd": float(last.std(ddof=1)) if len(last) > 1 else 0.0,
        "note": "balanced_accuracy is measured at the epoch selected on the same validation fold, an optimistic "
                "estimate; last_epoch_balanced_accuracy (fixed number of epochs) is not selected on it",
        "relevance_inside_mask_mean": float(np.nanmean(cv.inside)),
        # how often held-out decisions flip when a region is replaced (explain.dependence)
        "flip_rates": flip_rates(cv.maps["zplus"].rows),
        "chance": chance_check(cohort.data.labels.numpy(), cv.probabilities.argmax(1), len(cohort.classes)),
        "per_fold": cv.fold_rows,
    }


def chance_check(labels: np.ndarray, predicted: np.ndarray, n_classes: int, alpha: float = 0.05) -> dict:
    """Is the pooled out-of-fold balanced accuracy distinguishable from chance? A one-sided
    binomial test of round(BA x n) successes in n trials at p = 1 / classes (an approximation:
    balanced accuracy weights the classes equally)."""
    from scipy.stats import binomtest

    ba = balanced_accuracy(labels, predicted, n_classes)
    n = len(labels)
    p_value = float(binomtest(int(round(ba * n)), n, 1.0 / n_classes, alternative="greater").pvalue)
    return {"p_value": p_value, "alpha": alpha, "near_chance": p_value > alpha,
            "test": "one-sided binomial test of round(balanced accuracy x n) correct of n at chance 1/classes"}


def warn_about_dependence(mode: str, summary: dict) -> None:
    """Say it plainly when the decisions rest on the outside of the brain, or on nothing."""
    outside = [v for k, v in summary["flip_rates"].items() if k.startswith("outside_") and v is not None]
    if outside and max(outside) > FLIP_RATE_WARNING:
        LOG.warning("mode %s: %.0f %% of the held-out decisions change when the outside of the brain is replaced "
                    "(threshold %.0f %%): the model relies on what lies outside the brain, whatever its relevance "
                    "share inside the brain (%.1f %%) says. %s", mode, 100 * max(outside), 100 * FLIP_RATE_WARNING,
                    100 * summary["relevance_inside_mask_mean"], FLIP_RATE_ADVICE)
    chance = summary.get("chance")
    if chance and chance["near_chance"]:
        LOG.warning("mode %s: pooled out-of-fold balanced accuracy %.2f is not distinguishable from chance "
                    "(binomial p = %.2f): the model may not have learned the target. %s", mode,
                    summary["pooled_oof_balanced_accuracy"], chance["p_value"], NEAR_CHANCE_ADVICE)


def _save_nifti(path: Path, data: np.ndarray, affine) -> None:
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nb.save(nb.Nifti1Image(data.astype(np.float32), affine), str(tmp))


def write_cv_outputs(settings: GroupSettings, mode: str, cohort: Cohort, cv: CrossValidation, summary: dict,
                     layout: ModeLayout) -> None:
    """cv_metrics, out-of-fold predictions, explanation metrics/regions and mean class maps."""
    classes = cohort.classes
    write_tsv(layout.cv_metrics_tsv, cv.folds)
    write_json(layout.cv_metrics_json, summary)
    oof = pd.DataFrame({
        "participant_id": [f"sub-{p}" for p in cohort.participants],
        "session_id": [f"ses-{s.session}" if s.session else "n/a" for s in cohort.samples],
        "fold": cv.fold_of, "true_label": [s.label for s in cohort.samples],
        "predicted_label": [classes[i] for i in cv.probabilities.argmax(1)],
        **{f"probability_{safe_label(c)}": cv.probabilities[:, j] for j, c in enumerate(classes)},
        "relevance_inside_mask": cv.inside,
    })
    write_tsv(layout.oof_predictions_tsv, oof)
    write_json(layout.oof_predictions_json, {
        "fold": {"Description": "cross-validation fold in which the participant was held out"},
        "true_label": {"Description": f"value of {settings.target_column} in participants.tsv"},
        "predicted_label": {"Description": "class with the highest out-of-fold probability"},
        **{f"probability_{safe_label(c)}": {"Description": f"out-of-fold probability of class {c!r}"} for c in classes},
        "relevance_inside_mask": {"Description": "fraction of z+ relevance inside the brain mask (out-of-fold model)"},
    })
    for method, collected in cv.maps.items():
        method_dir = layout.method_dir(method)
        collected.write_metrics(method_dir, oof["predicted_label"].tolist(), mode)
        collected.write_regions(method_dir)
        for c, mean in collected.class_means().items():
            _save_nifti(layout.mean_map(method_dir, settings.template, settings.resolution, c, method_desc(method)),
                        mean, cohort.affine)


def model_card(settings: GroupSettings, mode: str, cohort: Cohort, arch: Architecture, final: TrainSettings,
               collapsed_epoch, summary: dict) -> dict:
    y = cohort.data.labels.numpy()
    return {
        "mode": mode,
        "seed": settings.seed,
        "classes": cohort.classes,
        "target_column": settings.target_column,
        "input": {
            "template": settings.template, "resolution": settings.resolution, "grid_shape": list(arch.input_shape),
            "intensity_normalisation": NORMALISATION.to_dict(), "mask": "brain mask in template space",
            "image": settings.input_image,
            "guidance_mask": settings.guidance_mask,  # relevance-term mask (None: the brain mask)
            "preprocessing": "grazbids participant level (antspyx registration to the template)",
        },
        "training": {
            "optimizer": "Adam", "learning_rate": final.learning_rate, "warmup_epochs": final.warmup_epochs,
            "epochs": final.epochs,
            "batch_size": final.batch_size, "accumulation_steps": final.accumulation_steps,
            "relevance_weight": final.relevance_weight, "class_weights": "inverse frequency",
            "guidance_loss": final.guidance_loss, "guidance_power": final.guidance_power,
            "outside_penalty": final.outside_penalty, "outside_penalty_weight": final.outside_penalty_weight,
            "collapsed_epoch": collapsed_epoch,  # not None: a dead network (constant output)
            "epoch_rule": "median over CV folds of the epoch with the best validation balanced accuracy "
                          "(ties: higher relevance inside the mask, then later epoch)",
        },
        "training_data": {
            "dataset": cohort.dataset_name, "n_samples": len(cohort.samples),
            "n_participants": len(set(cohort.participants)),
            "n_per_class": {c: int((y == j).sum()) for j, c in enumerate(cohort.classes)},
            "cv": {k: v for k, v in summary.items() if k != "per_fold"},
        },
        "lrp": {"rule": "z+ in every layer (deep Taylor)", "start": "softmax vector"},
        "created_by": f"grazbids {__version__}",
    }


def train_mode(settings: GroupSettings, mode: str, cohort: Cohort, work_dir: Path, layout: ModeLayout) -> dict:
    """Cross-validation, then the final model on every sample; returns the CV summary."""
    arch = architecture_for(settings, tuple(cohort.data.images.shape[2:]), len(cohort.classes))
    cv = cross_validate(settings, mode, cohort, arch, work_dir, layout)
    summary = cv_summary(settings, mode, cohort, cv)
    warn_about_dependence(mode, summary)
    final_epochs = int(np.median(cv.folds["selected_epoch"]))
    LOG.info("mode %s: final model on all %d samples for %d epochs (median selected epoch)", mode,
             len(cohort.samples), final_epochs)
    final_settings = train_settings(settings, mode, final_epochs)
    final = Trainer(arch, final_settings, work_dir / "final", name=f"{mode} final").fit(
        cohort.data, np.arange(len(cohort.samples)))
    summary["final_model_collapsed_epoch"] = final.collapsed_epoch
    if not is_main_process():
        return summary
    write_cv_outputs(settings, mode, cohort, cv, summary, layout)
    write_text(layout.final_history, (work_dir / "final" / "history.tsv").read_text())
    save_bundle(layout.model_dir, final.model,
                model_card(settings, mode, cohort, arch, final_settings, final.collapsed_epoch, summary))
    # the "mean" fill of the participant level's decision dependence
    _save_nifti(layout.model_dir / MEAN_IMAGE_NAME, mean_image(cohort.data, np.arange(len(cohort.samples)))[0, 0].numpy(), cohort.affine)
    return summary


def run_group_training(settings: GroupSettings, work_dir: str | Path) -> dict:
    """Every mode of ``settings``; ``work_dir`` keeps the checkpoints (an interrupted run resumes)."""
    cohort = load_group_cohort(settings, Path(work_dir))
    layout = GroupLayout(settings.output_dir)
    cohort_dir = Path(work_dir) / f"cohort-{cohort.key}"
    LOG.info("group level: training checkpoints in %s (an interrupted run resumes from them)", cohort_dir)
    summaries = {mode: train_mode(settings, mode, cohort, cohort_dir / f"mode-{mode}", layout.mode(mode))
                 for mode in settings.modes}
    if is_main_process():
        write_modes_summary(layout, summaries)
    return summaries


def write_modes_summary(layout: GroupLayout, summaries: dict[str, dict]) -> None:
    """One row per trained mode: CV accuracy and where its heat maps put relevance."""
    rows = []
    for mode, cv in summaries.items():
        explanation = json.loads((layout.mode(mode).root / "explanation_summary.json").read_text())["mean"]
        rows.append({
            "mode": mode, "balanced_accuracy_mean": cv["balanced_accuracy_mean"],
            "balanced_accuracy_sd": cv["balanced_accuracy_sd"],
            "pooled_oof_balanced_accuracy": cv["pooled_oof_balanced_accuracy"],
            "last_epoch_balanced_accuracy_mean": cv["last_epoch_balanced_accuracy_mean"],
            "last_epoch_balanced_accuracy_sd": cv["last_epoch_balanced_accuracy_sd"],
            **{k: (np.nan if v is None else v) for k, v in explanation.items()},
        })
    write_tsv(layout.modes_summary, pd.DataFrame(rows))
