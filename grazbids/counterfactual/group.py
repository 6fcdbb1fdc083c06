"""Group level: train a simulator against a mode's final model and write the group-mean
log-Jacobian maps per class and direction (template space), with per-region means when
an atlas is given.

    group/mode-<mode>/model/simulator/                                  the simulator bundle
    group/mode-<mode>/counterfactual/tpl-<tpl>_res-<r>_class-<c>_desc-<inject|remove>_logjacobian.nii.gz
    group/mode-<mode>/counterfactual/summary.json, regions.tsv (--atlas: mean log-Jacobian per region)

The maps average the images the simulator was trained on (correctly classified ones):
"inject" over the classes other than the disease class, "remove" over the disease class.
"""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import torch

from ..engine.bundle import load_bundle
from ..group.layout import ModeLayout
from ..utils.atomic import atomic_path, write_json, write_tsv
from .apply import counterfactuals
from .bundle import load_simulator
from .cohort import load_training_images
from .run import check_classifier_card, train_simulator
from .training import SimulatorSettings, correctly_classified

LOG = logging.getLogger("grazbids.counterfactual")


def _safe(label: str) -> str:
    import re

    return re.sub(r"[^a-zA-Z0-9]", "", str(label)) or "class"


def group_counterfactual(model_dir: str | Path, *, bids_dir, output_dir, participants, epochs: int, seed: int,
                         device: str, workdir: str | Path, atlas: str | Path | None = None) -> Path:
    """Train, then write the group maps into ``model_dir/../counterfactual``; returns that folder."""
    model_dir = Path(model_dir)
    card = check_classifier_card(model_dir)
    images, masks, labels, ids = load_training_images(card, bids_dir, output_dir, list(participants))
    settings = SimulatorSettings(epochs=epochs, seed=seed, device=device)
    train_simulator(model_dir, images, masks, labels, settings, workdir=workdir,
                    training_data={"bids_dir": str(bids_dir), "participants": ids})
    simulator, sim_card = load_simulator(model_dir)
    classifier, card = load_bundle(model_dir)
    classes = [str(c) for c in card["classes"]]
    positive = classes.index(str(sim_card["classifier"]["positive_class"]))
    x_all = images * masks if card["mode"] == "masked" else images
    used = correctly_classified(classifier, x_all, labels, torch.device("cpu"))
    sums: dict[tuple[int, str], np.ndarray] = {}
    counts: dict[tuple[int, str], int] = {}
    flips: dict[str, list[bool]] = {"inject": [], "remove": []}
    folded = []
    for i in used:
        direction = "remove" if int(labels[i]) == positive else "inject"
        r = counterfactuals(classifier, simulator, x_all[i:i + 1], masks[i:i + 1], positive,
                            directions=(direction,))[direction]
        key = (int(labels[i]), direction)
        sums[key] = sums.get(key, 0) + r.log_jacobian * masks[i, 0].numpy()
        counts[key] = counts.get(key, 0) + 1
        flips[direction].append(int(np.argmax(r.probabilities_after)) != int(labels[i]))
        folded.append(r.folded_fraction)
    out_dir = ModeLayout(model_dir.parent).counterfactual_dir
    template, res = card["input"]["template"], card["input"]["resolution"]
    reference = _reference(output_dir, template, res)
    maps, rows = {}, []
    region_labels = _atlas(atlas, reference) if atlas else None
    for (label, direction), total in sorted(sums.items()):
        mean = total / counts[(label, direction)]
        name = f"tpl-{template}_res-{res}_class-{_safe(classes[label])}_desc-{direction}_logjacobian.nii.gz"
        img = nb.Nifti1Image(mean.astype(np.float32), reference.affine)
        with atomic_path(out_dir / name, suffix=".nii.gz") as tmp:
            nb.save(img, str(tmp))
        maps[f"{classes[label]}/{direction}"] = name
        if region_labels is not None:
            labels_img, names = region_labels
            for index, region in sorted(names.items()):
                inside = labels_img == index
                rows.append({"class": classes[label], "direction": direction, "region": region,
                             "mean_log_jacobian": float(mean[inside].mean()) if inside.any() else float("nan"),
                             "n_voxels": int(inside.sum())})
    if rows:
        write_tsv(out_dir / "regions.tsv", pd.DataFrame(rows))
    history = model_dir / "simulator" / "simulator_card.json"
    write_json(out_dir / "summary.json", {
        "simulator": str(model_dir / "simulator"),
        "classes": classes, "positive_class": classes[positive],
        "n_images": int(len(labels)), "n_correctly_classified": int(len(used)),
        "n_per_map": {f"{classes[k[0]]}/{k[1]}": v for k, v in counts.items()},
        "flip_fraction": {d: float(np.mean(v)) if v else None for d, v in flips.items()},
        "folded_fraction_mean": float(np.mean(folded)) if folded else None,
        "maps": maps,
        "note": "training images (the simulator saw them); log-Jacobian = log(volume in simulated / original)",
        "simulator_card": str(history),
    })
    return out_dir


def _reference(output_dir, template: str, res) -> nb.Nifti1Image:
    from ..templates import get_template

    return nb.load(str(get_template(template, int(res)).brain_mask))


def _atlas(path, reference):
    from ..evaluate.atlas import load_atlas

    atlas = load_atlas(path, reference)
    return atlas.labels, atlas.names
