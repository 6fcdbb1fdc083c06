"""Apply a trained model bundle to one preprocessed T1w: probabilities and z+ heat map."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from .bundle import ModelBundleError, load_bundle
from .device import resolve_device
from .lrp import zplus_heatmap
from .model import GrazPlusNet
from .modes import model_input
from .normalize import IntensityNormalisation


@dataclass
class Prediction:
    classes: list[str]
    probabilities: np.ndarray  # (n_classes,)
    heatmap: np.ndarray  # relevance per voxel, template grid
    affine: np.ndarray
    # decision dependence on the outside of the brain: "outside_<fill>" ->
    # {"prob_change": ..., "flip": 0/1} (grazbids.explain.dependence)
    dependence: dict = field(default_factory=dict)

    @property
    def predicted(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]


def input_tensor(data: np.ndarray, mask: np.ndarray, card: dict, device) -> torch.Tensor:
    """(1, 1, D, H, W) tensor as the model saw it in training (see :func:`model_input`)."""
    x = torch.from_numpy(data)[None, None].to(device)
    return model_input(x, torch.from_numpy(mask)[None, None].to(device), card["mode"])


def load_input(image_path: str | Path, mask_path: str | Path, card: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised image and mask as float32 arrays on the model's grid (checked)."""
    image = nb.load(str(image_path))
    mask = nb.load(str(mask_path))
    expected = tuple(card["input"]["grid_shape"])
    for img, path in ((image, image_path), (mask, mask_path)):
        if tuple(img.shape[:3]) != expected or len(img.shape) != 3:
            raise ModelBundleError(
                f"{path}: grid {img.shape} does not match the model's input grid {expected} "
                f"({card['input']['template']} res-{card['input']['resolution']}); preprocess with the same "
                "--template and --resolution the model was trained with"
            )
    mask_data = (np.asanyarray(mask.dataobj) > 0.5).astype(np.float32)
    norm = IntensityNormalisation.from_dict(card["input"]["intensity_normalisation"])
    from ..utils.input_image import is_skull_stripped, network_input  # the image as in training

    raw = network_input(np.asanyarray(image.dataobj), mask_data, input_image=card["input"].get("image", "brain"),
                        skull_stripped=is_skull_stripped(image_path))
    data = norm.apply(raw, mask_data)
    return data, mask_data, image.affine


def zplus_map(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The z+ map from the softmax vector (grazbids.explain, which uses the engine's fused
    sweep for the Graz+ network) and the logits."""
    from ..explain import explain  # late: grazbids.explain builds on the engine
    from ..explain.model_state import evaluation_mode

    if isinstance(model, GrazPlusNet):  # the fused sweep gives the logits too: no second forward
        with evaluation_mode(model), torch.no_grad():
            relevance, logits = zplus_heatmap(model, x, "softmax")
        return relevance, logits
    with torch.no_grad():
        logits = model(x)
    return explain(model, x, "zplus", target="softmax"), logits


MEAN_IMAGE_NAME = "mean_image.nii.gz"  # beside a bundle: the training cohort's mean normalised image


def load_mean_image(model_dir: str | Path, card: dict) -> np.ndarray | None:
    """The bundle's mean training image (the "mean" fill of the decision dependence), if any."""
    path = Path(model_dir) / MEAN_IMAGE_NAME
    if not path.exists():
        return None
    data = np.asanyarray(nb.load(str(path)).dataobj, dtype=np.float32)
    if data.shape != tuple(card["input"]["grid_shape"]):
        raise ModelBundleError(f"{path}: grid {data.shape} differs from the model's {tuple(card['input']['grid_shape'])}")
    return data


def outside_dependence(model, data: np.ndarray, mask: np.ndarray, card: dict, device,
                       mean_image: np.ndarray | None) -> dict:
    """How the decision changes when everything outside the brain mask is set to 0 (and to
    the training mean image when the bundle has one)."""
    from ..explain.dependence import decision_dependence  # late: grazbids.explain builds on the engine

    x = torch.from_numpy(data)[None, None].to(device)
    brain = torch.from_numpy(mask)[None, None].to(device)
    fills = {"zero": 0.0}
    if mean_image is not None:
        fills["mean"] = torch.from_numpy(mean_image)[None, None].to(device)
    out = {}
    for name, fill in fills.items():
        result = decision_dependence(model, x, 1 - brain, fill, prepare=lambda images: model_input(images, brain, card["mode"]))
        out[f"outside_{name}"] = {"prob_change": float(result.change[0]), "flip": int(result.flipped[0])}
    return out


def predict(model_dir: str | Path, image_path: str | Path, mask_path: str | Path, device: str = "auto", model=None) -> Prediction:
    """Probabilities and the Graz+ z+ map (started from the softmax vector) of one image."""
    dev = resolve_device(device)
    if model is None:
        model, card = load_bundle(model_dir, device=dev)
    else:
        model, card = model
    data, mask, affine = load_input(image_path, mask_path, card)
    x = input_tensor(data, mask, card, dev)
    with torch.inference_mode():
        relevance, logits = zplus_map(model, x)
    probs = torch.softmax(logits, dim=1)[0].cpu().numpy().astype(np.float64)
    dependence = outside_dependence(model, data, mask, card, dev, load_mean_image(model_dir, card))
    return Prediction(list(card["classes"]), probs, relevance[0, 0].cpu().numpy(), affine, dependence)
