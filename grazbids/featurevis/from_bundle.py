"""Feature visualisation of a model bundle on its template grid: a NIfTI with the template
affine, a JSON sidecar that says how it was made, and a PNG figure for the group report."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from .. import __version__
from ..engine.bundle import load_bundle
from ..engine.device import resolve_device
from ..engine.normalize import IntensityNormalisation
from ..templates import TemplateFiles, get_template
from ..utils.atomic import atomic_path, write_json
from .ascent import AscentResult, AscentSettings, maximise
from .figure import featurevis_figure
from .objectives import ClassLogit, Objective, class_objective

LOG = logging.getLogger(__name__)
TEMPLATE_START = "template"
METHOD = "activation maximisation (gradient ascent on the input, Adam)"
REFERENCES = [
    "Eitel, Melkonyan, Ritter (2022) Going beyond saliency maps? Feature visualization "
    "for neuroimaging CNNs, arXiv:2203.13120",
    "Olah, Mordvintsev, Schubert (2017) Feature Visualization, Distill, doi:10.23915/distill.00007",
]


@dataclass(frozen=True)
class FeatureVisOutputs:
    nifti: Path
    sidecar: Path
    figure: Path
    result: AscentResult


def _load_volume(path: Path, shape: tuple, what: str) -> nb.Nifti1Image:
    try:
        img = nb.load(str(path))
    except (OSError, nb.filebasedimages.ImageFileError) as err:
        raise ValueError(f"{path}: cannot read the {what} ({err})") from None
    if tuple(img.shape[:3]) != tuple(shape) or (len(img.shape) > 3 and np.prod(img.shape[3:]) != 1):
        raise ValueError(f"{path}: the {what} has shape {img.shape}, expected the model's grid "
                         f"{tuple(shape)} (resample it to the template grid first)")
    return img


def _template_for(card: dict, bundle: Path) -> TemplateFiles:
    template = get_template(card["input"]["template"], card["input"]["resolution"])
    grid = tuple(int(s) for s in card["input"]["grid_shape"])
    if tuple(template.shape) != grid:
        raise ValueError(f"{bundle}: the model's grid {grid} differs from template "
                         f"{template.name} res-{template.resolution} {template.shape}")
    return template


def _start_image(start_image, template: TemplateFiles, norm: IntensityNormalisation,
                 mask: np.ndarray, grid: tuple) -> tuple[np.ndarray, str]:
    """The start image normalised like the training inputs, and its description."""
    if start_image == TEMPLATE_START:
        path, description = template.t1w, f"template T1w ({template.name} mean image)"
    else:
        path = Path(start_image)
        description = str(path)
    data = np.asanyarray(_load_volume(path, grid, "start image").dataobj, dtype=np.float32).reshape(grid)
    try:
        return norm.apply(data, mask), f"{description}, intensity-normalised as the model's inputs"
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _objective(objective: Objective | str | int, classes: list[str]) -> Objective:
    if isinstance(objective, (str, int)):
        return class_objective(objective, classes)
    if isinstance(objective, ClassLogit) and objective.name is None and 0 <= objective.index < len(classes):
        return ClassLogit(objective.index, str(classes[objective.index]))
    return objective


def _save_nifti(data: np.ndarray, reference: nb.Nifti1Image, target: Path) -> Path:
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), reference.affine)
    img.header.set_xyzt_units("mm")
    for set_form, code in ((img.header.set_qform, reference.header["qform_code"]),
                           (img.header.set_sform, reference.header["sform_code"])):
        set_form(reference.affine, code=int(code) or 1)
    with atomic_path(target, suffix=".nii.gz") as tmp:
        nb.save(img, str(tmp))
    return target


def visualise_bundle(
    bundle: str | Path,
    out_dir: str | Path,
    objective: Objective | str | int,
    settings: AscentSettings = AscentSettings(),
    *,
    start_image: str | Path | None = None,
    use_mask: bool = True,
    clamp: bool = True,
    device: str = "auto",
) -> FeatureVisOutputs:
    """Visualise ``objective`` (an objective, or a class name/index) of the model bundle.

    The image lives on the card's template grid; ``use_mask`` restricts it to the template
    brain mask; ``clamp`` keeps it in [0, clip_max] of the card's intensity normalisation.
    With ``settings.start == "image"``, ``start_image`` is ``"template"`` (the template
    T1w, a mean brain) or a NIfTI on the template grid; it is normalised like the
    training inputs. Writes ``featurevis_<objective>.nii.gz``, ``.json`` and ``.png``.
    """
    bundle = Path(bundle)
    model, card = load_bundle(bundle, device=resolve_device(device))
    template = _template_for(card, bundle)
    grid = tuple(int(s) for s in card["input"]["grid_shape"])
    mask_img = _load_volume(template.brain_mask, grid, "template brain mask")
    mask = np.asanyarray(mask_img.dataobj).reshape(grid) > 0.5
    norm = IntensityNormalisation.from_dict(card["input"]["intensity_normalisation"])
    objective = _objective(objective, list(card["classes"]))

    start, start_description = None, None
    if start_image is not None and settings.start != "image":
        raise ValueError(f"start_image {start_image} is given but settings.start is {settings.start!r}, not 'image'")
    if settings.start == "image":
        if start_image is None:
            raise ValueError("start 'image' needs start_image: 'template' or a NIfTI path")
        start, start_description = _start_image(start_image, template, norm, mask, grid)
    value_range = (0.0, float(norm.clip_max)) if clamp else None
    result = maximise(model, objective, settings, start_image=start, mask=mask if use_mask else None,
                      value_range=value_range, input_shape=grid)

    out_dir = Path(out_dir)
    stem = f"featurevis_{result.objective.slug}"
    background = nb.load(str(template.t1w))
    nifti = _save_nifti(result.image.numpy(), background, out_dir / f"{stem}.nii.gz")
    signed = settings.start == "image"
    shown = result.image - result.start_image if signed else result.image
    title = f"{card.get('target_column', 'class')}: {result.objective.slug}"
    png = featurevis_figure(nb.Nifti1Image(shown.numpy().astype(np.float32), background.affine),
                            background, mask_img, title=title + (" (change from start)" if signed else ""),
                            signed=signed)
    with atomic_path(out_dir / f"{stem}.png", suffix=".png") as tmp:
        tmp.write_bytes(png)
    sidecar = write_json(out_dir / f"{stem}.json", {
        "Method": METHOD,
        "References": REFERENCES,
        "Model": str(bundle.resolve()),
        "ModelClasses": list(card["classes"]),
        "TargetColumn": card.get("target_column"),
        "Objective": result.objective.describe(),
        "Parameterisation": result.parameterisation,
        "Regularisers": {
            **settings.regularisers.to_dict(),
            "mask": "template brain mask (image multiplied by it)" if use_mask else None,
            "clamp": list(value_range) if value_range else None,
            "penalties_and_blur_act_on": result.penalised,
        },
        "Start": start_description or settings.start,
        "NoiseMeanSD": [settings.noise_mean, settings.noise_sd] if settings.start == "noise" else None,
        "Optimizer": "Adam",
        "LearningRate": settings.lr,
        "Iterations": settings.iterations,
        "Seed": settings.seed,
        "ObjectiveValue": result.objective_value,
        "ObjectiveValueStart": result.start_value,
        "ObjectiveGradientAtStart": result.start_gradient,
        "ObjectiveGradientAtStartDescription": "mean |d objective / d voxel| inside the mask at the start "
                                               "image: the scale that the penalty weights compete with",
        "SecondsPerIteration": round(result.seconds_per_iteration, 4),
        "Device": str(next(model.parameters()).device),
        "Template": template.name,
        "Resolution": template.resolution,
        "Units": "normalised intensity (the model's input scale)",
        "Figure": f"{stem}.png: " + ("image minus start image" if signed else "the optimised image")
                  + " over the template T1w",
        "GeneratedBy": {"Name": "grazbids.featurevis", "Version": __version__},
    })
    LOG.info("%s: objective %.4g -> %.4g in %d steps (%.3f s/step); mean |gradient| per voxel at the "
             "start %.3g", nifti, result.start_value, result.objective_value, settings.iterations,
             result.seconds_per_iteration, result.start_gradient)
    return FeatureVisOutputs(nifti=nifti, sidecar=sidecar, figure=out_dir / f"{stem}.png", result=result)
