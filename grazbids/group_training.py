"""Group level: Graz+ training with participant-wise cross-validation on preprocessed data.

For each mode: k-fold CV split by participant (metrics, out-of-fold predictions and
out-of-fold heat maps), then a final model trained on every participant for the median
of the epochs the folds selected; it is written as a model bundle whose card records
the CV scores. Outputs go to ``output_dir/group/mode-<mode>/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import torch

from . import __version__
from .engine import (
    Architecture, IntensityNormalisation, Trainer, TrainingData, TrainSettings, balanced_accuracy,
    encode_labels, participant_folds, save_bundle,
)
from .engine.architectures import kondrateva_architecture
from .engine.trainer import distributed_rank_and_size
from .atlas import Atlas, AtlasError, load_atlas
from .explain import explain as explain_map
from .explain.targets import method_desc, resolve_target
from .inference import zplus_map
from .explanation_table import reference_masks, tissue_maps
from .oof_maps import OutOfFoldMaps
from .utils.atomic import atomic_path, write_json, write_text, write_tsv

LOG = logging.getLogger("grazbids.group")
NORMALISATION = IntensityNormalisation()


class GroupInputError(ValueError):
    """Unusable group-level input (the message names the file and the problem)."""


@dataclass
class Sample:
    participant: str
    session: str | None
    image: Path
    mask: Path
    label: str
    tissues: dict[str, Path] = field(default_factory=dict)  # GM/WM/CSF probabilities in template space
    references: dict[str, Path] = field(default_factory=dict)  # known effect/shortcut masks (derivatives)


def _entity(name: str, key: str) -> str | None:
    match = re.search(rf"(?:^|_){key}-([a-zA-Z0-9]+)", name)
    return match.group(1) if match else None


def read_targets(bids_dir: str | Path, target_column: str) -> dict[str, str]:
    """participant label (without sub-) -> target value; n/a and empty values left out."""
    from .exitcodes import GrazbidsError
    from .utils.targets import MISSING_VALUES, read_participants_table

    try:
        columns, rows = read_participants_table(Path(bids_dir))
    except GrazbidsError as err:
        raise GroupInputError(str(err)) from None
    if target_column not in columns:
        raise GroupInputError(f"{Path(bids_dir) / 'participants.tsv'}: no column {target_column!r} "
                              f"(columns: {', '.join(columns)})")
    targets = {}
    for row in rows:
        value = (row.get(target_column) or "").strip()
        if value not in MISSING_VALUES:
            targets[(row.get("participant_id") or "").strip().removeprefix("sub-")] = value
    return targets


def find_samples(
    output_dir: str | Path, participants: list[str], targets: dict[str, str], template: str, resolution: int,
    target_column: str = "target", bids_dir: str | Path | None = None,
) -> list[Sample]:
    """Preprocessed T1w + brain mask in template space, one sample per session/run."""
    samples = []
    for participant in participants:
        if participant not in targets:
            LOG.warning("sub-%s: no %s value in participants.tsv; left out of training", participant, target_column)
            continue
        pattern = f"sub-{participant}*_space-{template}_res-{resolution}_desc-preproc_T1w.nii.gz"
        for image in sorted(Path(output_dir, f"sub-{participant}").rglob(pattern)):
            mask = image.with_name(image.name.replace("_desc-preproc_T1w", "_desc-brain_mask"))
            if not mask.exists():
                raise GroupInputError(f"{image}: brain mask {mask.name} is missing; rerun the participant level")
            session = _entity(image.name, "ses")
            references = reference_masks(Path(bids_dir), participant, session, template, resolution) if bids_dir else {}
            samples.append(Sample(participant, session, image, mask, targets[participant],
                                  tissue_maps(image), references))
    return samples


GUIDANCE_SPEC = re.compile(r"^(desc|label)-([a-zA-Z0-9]+)$")


def find_guidance_masks(samples: list[Sample], spec: str, *, bids_dir, output_dir, template: str,
                        resolution: int) -> list[Path]:
    """Per sample, the template-space mask named by ``spec``: ``desc-<x>`` finds
    ``*_desc-<x>_mask.nii.gz``, ``label-<x>`` ``*_label-<x>_probseg.nii.gz`` or ``_mask``; searched
    in output_dir (grazbids' own masks) and in the input dataset's derivatives."""
    match = GUIDANCE_SPEC.match(spec)
    if not match:
        raise GroupInputError(f"--guidance-mask {spec!r}: use desc-<label> (e.g. desc-lesion) or label-<label> "
                              "(e.g. label-GM)")
    entity, value = match.groups()
    suffixes = ("mask",) if entity == "desc" else ("probseg", "mask")
    roots = [Path(output_dir)] + sorted(p for p in (Path(bids_dir) / "derivatives").glob("*") if p.is_dir())
    found = []
    for s in samples:
        ses = f"_ses-{s.session}" if s.session else ""
        names = [f"sub-{s.participant}{ses}*_space-{template}_res-{resolution}_{entity}-{value}_{suffix}.nii.gz"
                 for suffix in suffixes]
        hits = [hit for root in roots for name in names for hit in sorted(root.glob(f"sub-{s.participant}/**/{name}"))]
        if not hits:
            raise GroupInputError(
                f"sub-{s.participant}{ses}: no guidance mask {names[0]} in {output_dir} or "
                f"{Path(bids_dir) / 'derivatives'}/*; --guidance-mask needs one per participant in template space"
            )
        found.append(hits[0])
    return found


def load_cohort(samples: list[Sample], guidance: list[Path] | None = None) -> tuple[TrainingData, list[str], np.ndarray]:
    labels, classes = encode_labels([s.label for s in samples])
    if len(classes) < 2:
        raise GroupInputError(f"the target has only one class ({classes}) among the selected participants")
    images, masks, affine = [], [], None
    for k, s in enumerate(samples):
        img = nb.load(str(s.image))
        mask = (np.asanyarray(nb.load(str(s.mask)).dataobj) > 0.5).astype(np.float32)
        images.append(NORMALISATION.apply(np.asanyarray(img.dataobj), mask))
        if guidance is not None:  # channel 1: the guidance mask, kept inside the brain
            extra = np.asanyarray(nb.load(str(guidance[k])).dataobj, dtype=np.float32)
            if extra.shape != mask.shape:
                raise GroupInputError(f"{guidance[k]}: grid {extra.shape} differs from the brain mask's {mask.shape}")
            mask = np.stack([mask, np.clip(extra, 0, 1) * mask])
        masks.append(mask)
        affine = img.affine if affine is None else affine
    if len({im.shape for im in images}) != 1:
        raise GroupInputError("preprocessed images have different grids; rerun the participant level with one --template/--resolution")
    data = TrainingData(
        torch.from_numpy(np.stack(images)[:, None]),
        torch.from_numpy(np.stack(masks) if guidance is not None else np.stack(masks)[:, None]),
        torch.from_numpy(labels), len(classes),
    )
    return data, classes, affine


def cohort_key(samples: list[Sample], cv_folds: int, template: str, resolution: int,
               guidance: list[Path] | None = None) -> str:
    """Names the checkpoint folder: a checkpoint only resumes for the same cohort and folds.

    (The trainer's own fingerprint covers the settings and the training indices, not which
    images those indices point to.)
    """
    content = [[str(Path(s.image).resolve()), s.image.stat().st_mtime_ns, s.label] for s in samples]
    content += [cv_folds, template, resolution]  # a rewritten image (new mtime) starts afresh
    content += [[str(Path(p).resolve()), Path(p).stat().st_mtime_ns] for p in guidance or []]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]


def _is_main_process() -> bool:
    """Under torchrun every process trains; only rank 0 writes the shared outputs."""
    return distributed_rank_and_size()[0] == 0


def _safe(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]", "", label) or "class"


def _save_nifti(path: Path, data: np.ndarray, affine) -> None:
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nb.save(nb.Nifti1Image(data.astype(np.float32), affine), str(tmp))


def train_mode(
    mode: str, data: TrainingData, samples: list[Sample], classes: list[str], affine, *, out_dir: Path, work_dir: Path,
    cv_folds: int, epochs: int, seed: int, device: str, template: str, resolution: int, target_column: str,
    dataset_name: str, training_options: dict | None = None, guidance_mask: str | None = None,
    architecture: str = "grazplus", explain: tuple[str, ...] = (), explain_target: str = "predicted",
    atlas: Atlas | None = None,
) -> dict:
    shape = tuple(data.images.shape[2:])
    arch = (kondrateva_architecture(shape, len(classes)) if architecture == "kondrateva"
            else Architecture(shape, n_classes=len(classes)))
    options = dict(training_options or {})
    settings = TrainSettings(mode=mode, epochs=epochs, seed=seed, device=device, **options)
    participants = [s.participant for s in samples]
    folds = participant_folds(participants, data.labels.numpy(), cv_folds, seed)
    for k, (train, _) in enumerate(folds, start=1):
        missing = set(range(len(classes))) - set(data.labels[train].tolist())
        if missing:
            raise GroupInputError(
                f"with {cv_folds} folds, fold {k} would train without any participant of class "
                f"{', '.join(repr(classes[c]) for c in sorted(missing))}; use fewer --cv-folds or more participants"
            )
    oof_probs = np.full((len(samples), len(classes)), np.nan)
    oof_fold = np.zeros(len(samples), dtype=int)
    oof_inside = np.full(len(samples), np.nan)
    # z+ (the engine's own map) and the requested grazbids.explain methods, out of fold
    maps = {method: OutOfFoldMaps(method, samples, classes, arch.input_shape, atlas)
            for method in ("zplus", *explain)}
    target = resolve_target(explain_target, classes)
    fold_rows = []
    for k, (train, val) in enumerate(folds, start=1):
        LOG.info("mode %s: fold %d/%d (%d train, %d validation participants)", mode, k, cv_folds,
                 len({participants[i] for i in train}), len({participants[i] for i in val}))
        result = Trainer(arch, settings, work_dir / f"fold-{k}", name=f"{mode} fold {k}/{cv_folds}").fit(data, train, val)
        oof_probs[val] = result.val_probabilities
        oof_fold[val] = k
        x = data.images[val] * (data.masks[val, :1] if mode == "masked" else 1)
        with torch.inference_mode():
            relevance, _ = zplus_map(result.model, x)
        relevance = relevance[:, 0].numpy()
        inside = (relevance * data.masks[val, 0].numpy()).sum(axis=(1, 2, 3)) / np.maximum(relevance.sum(axis=(1, 2, 3)), 1e-12)
        oof_inside[val] = inside
        for i, r in zip(val, relevance):
            maps["zplus"].add(i, r, data.masks[i, 0].numpy())
        for method in explain:
            LOG.info("mode %s: fold %d/%d: out-of-fold %s maps", mode, k, cv_folds, method)
            for j, i in enumerate(val):
                heatmap = explain_map(result.model, x[j:j + 1], method, target=target)[0, 0].numpy()
                maps[method].add(i, heatmap, data.masks[i, 0].numpy())
        y_val = data.labels[val].numpy()
        fold_rows.append({
            "fold": k, "n_train": len(train), "n_validation": len(val), "selected_epoch": result.selected_epoch,
            "balanced_accuracy": balanced_accuracy(y_val, result.val_probabilities.argmax(1), len(classes)),
            "accuracy": float(np.mean(result.val_probabilities.argmax(1) == y_val)),
            "relevance_inside_mask": float(np.mean(inside)),
            # the selected epoch was chosen on this same fold (optimistic); the last epoch was not
            "last_epoch_balanced_accuracy": float(result.history[-1]["val_balanced_accuracy"]),
            # training stopped here: the output no longer depended on the input (dead ReLUs)
            "collapsed_epoch": result.collapsed_epoch,
        })
        if _is_main_process():
            write_text(out_dir / "history" / f"fold-{k}_history.tsv", (work_dir / f"fold-{k}" / "history.tsv").read_text())

    folds_table = pd.DataFrame(fold_rows)
    ba = folds_table["balanced_accuracy"].to_numpy()
    last = folds_table["last_epoch_balanced_accuracy"].to_numpy()
    y_all = data.labels.numpy()
    cv_summary = {
        "mode": mode, "folds": cv_folds, "target_column": target_column, "classes": classes,
        "balanced_accuracy_mean": float(ba.mean()), "balanced_accuracy_sd": float(ba.std(ddof=1)) if len(ba) > 1 else 0.0,
        "balanced_accuracy_min": float(ba.min()), "balanced_accuracy_max": float(ba.max()),
        "pooled_oof_balanced_accuracy": balanced_accuracy(y_all, oof_probs.argmax(1), len(classes)),
        "last_epoch_balanced_accuracy_mean": float(last.mean()),
        "last_epoch_balanced_accuracy_sd": float(last.std(ddof=1)) if len(last) > 1 else 0.0,
        "note": "balanced_accuracy is measured at the epoch selected on the same validation fold, an optimistic "
                "estimate; last_epoch_balanced_accuracy (fixed number of epochs) is not selected on it",
        "relevance_inside_mask_mean": float(np.nanmean(oof_inside)),
        "per_fold": fold_rows,
    }
    final_epochs = int(np.median(folds_table["selected_epoch"]))
    LOG.info("mode %s: final model on all %d samples for %d epochs (median selected epoch)", mode, len(samples), final_epochs)
    final_settings = TrainSettings(mode=mode, epochs=final_epochs, seed=seed, device=device, **options)
    final = Trainer(arch, final_settings, work_dir / "final", name=f"{mode} final").fit(data, np.arange(len(samples)))
    cv_summary["final_model_collapsed_epoch"] = final.collapsed_epoch
    if not _is_main_process():
        return cv_summary

    write_tsv(out_dir / "cv_metrics.tsv", folds_table)
    write_json(out_dir / "cv_metrics.json", cv_summary)

    oof = pd.DataFrame({
        "participant_id": [f"sub-{p}" for p in participants],
        "session_id": [f"ses-{s.session}" if s.session else "n/a" for s in samples],
        "fold": oof_fold, "true_label": [s.label for s in samples],
        "predicted_label": [classes[i] for i in oof_probs.argmax(1)],
        **{f"probability_{_safe(c)}": oof_probs[:, j] for j, c in enumerate(classes)},
        "relevance_inside_mask": oof_inside,
    })
    write_tsv(out_dir / "oof_predictions.tsv", oof)
    write_json(out_dir / "oof_predictions.json", {
        "fold": {"Description": "cross-validation fold in which the participant was held out"},
        "true_label": {"Description": f"value of {target_column} in participants.tsv"},
        "predicted_label": {"Description": "class with the highest out-of-fold probability"},
        **{f"probability_{_safe(c)}": {"Description": f"out-of-fold probability of class {c!r}"} for c in classes},
        "relevance_inside_mask": {"Description": "fraction of z+ relevance inside the brain mask (out-of-fold model)"},
    })
    for method, collected in maps.items():
        # z+ keeps its historical place in the mode folder; other methods get a subfolder
        method_dir = out_dir if method == "zplus" else out_dir / f"explain-{method_desc(method)}"
        collected.write_metrics(method_dir, oof["predicted_label"].tolist(), mode)
        collected.write_regions(method_dir)
        for c, mean in collected.class_means().items():
            _save_nifti(method_dir / f"tpl-{template}_res-{resolution}_class-{_safe(c)}_desc-mean{method_desc(method)}"
                                     "_heatmap.nii.gz", mean, affine)

    write_text(out_dir / "history" / "final_history.tsv", (work_dir / "final" / "history.tsv").read_text())
    counts = {c: int((y_all == j).sum()) for j, c in enumerate(classes)}
    card = {
        "mode": mode,
        "seed": seed,
        "classes": classes,
        "target_column": target_column,
        "input": {
            "template": template, "resolution": resolution, "grid_shape": list(arch.input_shape),
            "intensity_normalisation": NORMALISATION.to_dict(), "mask": "brain mask in template space",
            "guidance_mask": guidance_mask,  # relevance-term mask (None: the brain mask)
            "preprocessing": "grazbids participant level (antspyx registration to the template)",
        },
        "training": {
            "optimizer": "Adam", "learning_rate": final_settings.learning_rate, "epochs": final_epochs,
            "batch_size": final_settings.batch_size, "accumulation_steps": final_settings.accumulation_steps,
            "relevance_weight": final_settings.relevance_weight, "class_weights": "inverse frequency",
            "guidance_loss": final_settings.guidance_loss, "guidance_power": final_settings.guidance_power,
            "collapsed_epoch": final.collapsed_epoch,  # not None: a dead network (constant output)
            "epoch_rule": "median over CV folds of the epoch with the best validation balanced accuracy "
                          "(ties: higher relevance inside the mask, then later epoch)",
        },
        "training_data": {
            "dataset": dataset_name, "n_samples": len(samples), "n_participants": len(set(participants)),
            "n_per_class": counts, "cv": {k: v for k, v in cv_summary.items() if k != "per_fold"},
        },
        "lrp": {"rule": "z+ in every layer (deep Taylor)", "start": "softmax vector"},
        "created_by": f"grazbids {__version__}",
    }
    save_bundle(out_dir / "model", final.model, card)
    return cv_summary


def run_group_training(
    *, bids_dir, output_dir, participants: list[str], target_column: str, modes: list[str], cv_folds: int,
    epochs: int, seed: int, device: str, template: str, resolution: int, work_dir,
    training_options: dict | None = None, guidance_mask: str | None = None, architecture: str = "grazplus",
    explain: tuple[str, ...] = (), explain_target: str = "predicted", atlas: str | Path | None = None,
) -> dict:
    """``explain``: grazbids.explain methods whose out-of-fold maps are summarised beside the
    z+ ones; ``atlas``: a label image in the template space for per-region summaries."""
    output_dir, work_dir = Path(output_dir), Path(work_dir)
    targets = read_targets(bids_dir, target_column)
    samples = find_samples(output_dir, participants, targets, template, resolution, target_column, bids_dir)
    if len({s.participant for s in samples}) < cv_folds:
        raise GroupInputError(
            f"only {len({s.participant for s in samples})} participants with preprocessed data and a {target_column!r} "
            f"value; need at least --cv-folds={cv_folds}"
        )
    guidance = find_guidance_masks(samples, guidance_mask, bids_dir=bids_dir, output_dir=output_dir,
                                   template=template, resolution=resolution) if guidance_mask else None
    data, classes, affine = load_cohort(samples, guidance)
    try:  # checked before hours of training, not after
        resolve_target(explain_target, classes)
        regions = load_atlas(atlas, nb.load(str(samples[0].image))) if atlas else None
    except (ValueError, AtlasError) as err:
        raise GroupInputError(str(err)) from None
    counts = {c: int((data.labels.numpy() == j).sum()) for j, c in enumerate(classes)}
    LOG.info("group level: %d samples from %d participants, %s = %s", len(samples),
             len({s.participant for s in samples}), target_column, counts)
    try:
        dataset_name = json.loads((Path(bids_dir) / "dataset_description.json").read_text()).get("Name", "")
    except (OSError, json.JSONDecodeError):
        dataset_name = ""
    cohort_dir = work_dir / f"cohort-{cohort_key(samples, cv_folds, template, resolution, guidance)}"
    LOG.info("group level: training checkpoints in %s (an interrupted run resumes from them)", cohort_dir)
    summaries = {}
    for mode in modes:
        summaries[mode] = train_mode(
            mode, data, samples, classes, affine, out_dir=output_dir / "group" / f"mode-{mode}",
            work_dir=cohort_dir / f"mode-{mode}", cv_folds=cv_folds, epochs=epochs, seed=seed, device=device,
            template=template, resolution=resolution, target_column=target_column, dataset_name=dataset_name,
            training_options=training_options or {}, guidance_mask=guidance_mask, architecture=architecture,
            explain=tuple(explain), explain_target=explain_target, atlas=regions,
        )
    if _is_main_process():
        _write_modes_summary(output_dir / "group", summaries)
    return summaries


def _write_modes_summary(group_dir: Path, summaries: dict[str, dict]) -> None:
    """One row per trained mode: CV accuracy and where its heat maps put relevance."""
    rows = []
    for mode, cv in summaries.items():
        explanation = json.loads((group_dir / f"mode-{mode}" / "explanation_summary.json").read_text())["mean"]
        rows.append({
            "mode": mode, "balanced_accuracy_mean": cv["balanced_accuracy_mean"],
            "balanced_accuracy_sd": cv["balanced_accuracy_sd"],
            "pooled_oof_balanced_accuracy": cv["pooled_oof_balanced_accuracy"],
            "last_epoch_balanced_accuracy_mean": cv["last_epoch_balanced_accuracy_mean"],
            "last_epoch_balanced_accuracy_sd": cv["last_epoch_balanced_accuracy_sd"],
            **{k: (np.nan if v is None else v) for k, v in explanation.items()},
        })
    write_tsv(group_dir / "modes_summary.tsv", pd.DataFrame(rows))
