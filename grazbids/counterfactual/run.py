"""Train a simulator against a classifier bundle, and apply it to one preprocessed image.

Both read exactly what the classifier read: the template-space T1w and brain mask,
normalised as the model card says (``masked`` models: image x mask).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from .. import __version__
from ..engine.bundle import ModelBundleError, load_bundle, read_card
from ..engine.device import resolve_device
from ..engine.inference import input_tensor, load_input
from ..utils.atomic import atomic_path, write_json
from .apply import DIRECTIONS, counterfactuals, displacement_image, volume
from .bundle import SIMULATOR_DIR, SimulatorBundleError, classifier_hash, load_simulator, save_simulator
from .network import SimulatorArchitecture
from .training import SimulatorSettings, SimulatorTrainer

LOG = logging.getLogger("grazbids.counterfactual")
METHOD = ("counterfactual warp simulator (Liu, Adeli, Pohl, Zhao, IPMI 2021): a conditional 3D U-Net warps the "
          "image so that the frozen classifier's decision changes; explanation = log-Jacobian of the warp")
REFERENCE = "Liu Z, Adeli E, Pohl KM, Zhao Q (2021) Going beyond saliency maps: training deep models to " \
            "interpret deep models. IPMI 2021, LNCS 12729:71-82, doi:10.1007/978-3-030-78191-0_6"


def positive_index(card: dict, positive_class: str | None, where) -> int:
    """The disease class: ``positive_class`` (name), default the last class of the card."""
    classes = [str(c) for c in card["classes"]]
    if len(classes) < 2:
        raise SimulatorBundleError(f"{where}: the classifier has one class ({classes}); a counterfactual needs two")
    if positive_class is None:
        return len(classes) - 1
    if positive_class not in classes:
        raise SimulatorBundleError(f"{where}: class {positive_class!r} is not one of the model's classes {classes}")
    return classes.index(positive_class)


def check_classifier_card(bundle: Path) -> dict:
    """The classifier's card, refusing one-class models before the network is built."""
    path = Path(bundle) / "model_card.json"
    import json

    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelBundleError(f"{path}: model card not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelBundleError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, dict) and len(raw.get("classes", [])) < 2:
        raise SimulatorBundleError(f"{path}: the classifier has {len(raw.get('classes', []))} class(es) "
                                   f"({raw.get('classes')}); a counterfactual simulator needs a classifier of two or more")
    return read_card(bundle)


def default_workdir(bundle: Path) -> Path:
    import hashlib

    key = hashlib.sha256(str(Path(bundle).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"grazbids_counterfactual_{key}"


def train_simulator(bundle: str | Path, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                    settings: SimulatorSettings, *, positive_class: str | None = None, diffeomorphic: bool = False,
                    centre_field: bool = True, field_downsample: int = 2, channels: tuple[int, ...] = (8, 16, 32),
                    n_experts: int = 3,
                    workdir: str | Path | None = None, training_data: dict | None = None) -> Path:
    """Train against the bundle's classifier; ``images`` as load_input gives them (not yet masked).
    Writes ``bundle/simulator/``; returns that folder."""
    bundle = Path(bundle)
    card = check_classifier_card(bundle)
    positive = positive_index(card, positive_class, bundle / "model_card.json")
    device = resolve_device(settings.device)
    classifier, card = load_bundle(bundle, device=device)
    sha = classifier_hash(bundle)
    if card["mode"] == "masked":
        images = images * masks
    arch = SimulatorArchitecture(tuple(card["input"]["grid_shape"]), channels=tuple(channels), n_experts=n_experts,
                                 field_downsample=field_downsample, diffeomorphic=diffeomorphic,
                                 centre_field=centre_field)
    trainer = SimulatorTrainer(arch, settings, workdir or default_workdir(bundle))
    fit = trainer.fit(classifier, images, masks, labels, positive, sha)
    last = fit.history[-1] if fit.history else {}
    sim_card = {
        "method": METHOD,
        "references": [REFERENCE],
        "classifier": {"sha256": sha, "weights": "model.safetensors", "classes": list(card["classes"]),
                       "positive_class": card["classes"][positive], "mode": card["mode"],
                       "target_column": card.get("target_column")},
        "input": dict(card["input"]),
        "training": {**{k: v for k, v in asdict(settings).items() if k not in ("progress", "device")},
                     "epochs_per_phase": [p.epochs for p in settings.phases(centre_field)],
                     "n_images": len(labels), "n_correctly_classified_used": int(len(fit.used_index)),
                     "n_inject": int((labels[fit.used_index] != positive).sum()),
                     "n_remove": int((labels[fit.used_index] == positive).sum()),
                     "epochs_run": len(fit.history), "collapsed_epoch": fit.collapsed_epoch,
                     "final_epoch": last, "data": training_data or {}},
        "field": "displacement u in voxels; simulated(p) = original(p + u(p)); log-Jacobian = -log det(I + grad u) "
                 "= log(volume in simulated / volume in original)",
        "created_by": f"grazbids {__version__}",
    }
    return save_simulator(bundle, fit.simulator, sim_card)


def apply_to_image(bundle: str | Path, t1w_template: str | Path, mask_template: str | Path, out_dir: str | Path,
                   prefix: str = "", device: str = "auto", directions=tuple(DIRECTIONS)) -> dict:
    """Write, per direction, ``<prefix>desc-<dir>_T1w.nii.gz`` (the T1w warped, its own intensities),
    ``<prefix>desc-<dir>_displacement.nii.gz`` (mm, RAS axes), ``<prefix>desc-<dir>_logjacobian.nii.gz``
    and a JSON sidecar with the probabilities before and after. Returns {direction: {kind: path, ...}}."""
    bundle = Path(bundle)
    card = check_classifier_card(bundle)
    dev = resolve_device(device)
    simulator, sim_card = load_simulator(bundle, device=dev)
    classifier, card = load_bundle(bundle, device=dev)
    positive = [str(c) for c in card["classes"]].index(str(sim_card["classifier"]["positive_class"]))
    data, mask, affine = load_input(t1w_template, mask_template, card)
    x = input_tensor(data, mask, card, dev)
    raw = nb.load(str(t1w_template))
    display = torch.from_numpy(np.asanyarray(raw.dataobj, dtype=np.float32))[None, None].to(dev)
    results = counterfactuals(classifier, simulator, x, torch.from_numpy(mask).to(dev), positive, display, directions)
    out_dir = Path(out_dir)
    written = {}
    for name, r in results.items():
        paths = {kind: out_dir / f"{prefix}desc-{name}_{kind}.nii.gz" for kind in ("T1w", "displacement", "logjacobian")}
        for kind, img in (("T1w", volume(r.simulated, raw)), ("displacement", displacement_image(r.field, affine)),
                          ("logjacobian", volume(r.log_jacobian * mask, raw))):
            with atomic_path(paths[kind], suffix=".nii.gz") as tmp:
                nb.save(img, str(tmp))
        metadata = sidecar(r, card, sim_card, bundle)
        paths["json"] = write_json(out_dir / f"{prefix}desc-{name}_counterfactual.json", metadata)
        written[name] = {"paths": paths, "metadata": metadata}
    return written


def sidecar(r, card: dict, sim_card: dict, bundle: Path) -> dict:
    classes = [str(c) for c in card["classes"]]
    return {
        "Description": f"counterfactual ({r.direction} the pattern of class {sim_card['classifier']['positive_class']!r})",
        "Method": METHOD,
        "References": [REFERENCE],
        "Direction": r.direction,
        "Model": os.path.abspath(bundle),
        "Simulator": os.path.abspath(Path(bundle) / SIMULATOR_DIR),
        "ClassifierSHA256": sim_card["classifier"]["sha256"],
        "ModelClasses": classes,
        "PositiveClass": str(sim_card["classifier"]["positive_class"]),
        "ProbabilitiesBefore": {c: round(float(p), 6) for c, p in zip(classes, r.probabilities_before)},
        "ProbabilitiesAfter": {c: round(float(p), 6) for c, p in zip(classes, r.probabilities_after)},
        "PredictedBefore": classes[int(np.argmax(r.probabilities_before))],
        "PredictedAfter": classes[int(np.argmax(r.probabilities_after))],
        "LogOddsBefore": round(r.log_odds_before, 6),
        "LogOddsAfter": round(r.log_odds_after, 6),
        "FoldedFraction": r.folded_fraction,
        "MinJacobianDeterminant": r.min_jacobian,
        "Diffeomorphic": bool(sim_card["architecture"].get("diffeomorphic")),
        "LogJacobianDefinition": "log(local volume in the simulated image / volume in the original) = "
                                 "-log det(I + grad u); < 0 shrinkage, > 0 expansion; 0 outside the brain mask",
        "DisplacementDefinition": "u in mm along the world (RAS) axes; the simulated image at p shows the original at p + u(p)",
    }
