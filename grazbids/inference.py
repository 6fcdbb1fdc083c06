"""Apply a trained model bundle to one preprocessed T1w: probabilities and z+ heat map."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from .engine import IntensityNormalisation, ModelBundleError, load_bundle, resolve_device, zplus_heatmap
from .engine.model import GrazPlusNet


@dataclass
class Prediction:
    classes: list[str]
    probabilities: np.ndarray  # (n_classes,)
    heatmap: np.ndarray  # relevance per voxel, template grid
    affine: np.ndarray

    @property
    def predicted(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]


def model_input(data: np.ndarray, mask: np.ndarray, card: dict, device) -> torch.Tensor:
    """(1, 1, D, H, W) tensor as the model saw it in training (masked mode: image * mask)."""
    x = torch.from_numpy(data)[None, None].to(device)
    if card["mode"] == "masked":  # the masked-input CNN only ever saw image * mask
        x = x * torch.from_numpy(mask)[None, None].to(device)
    return x


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
    data = norm.apply(np.asanyarray(image.dataobj), mask_data)
    return data, mask_data, image.affine


def zplus_map(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z+ map from the softmax vector and the logits: the engine's fused version for the
    Graz+ network, the general LRP of grazbids.explain (batch norm folded) for others."""
    if isinstance(model, GrazPlusNet):
        return zplus_heatmap(model, x, "softmax")
    from .explain import explain

    with torch.no_grad():
        logits = model(x)
    return explain(model, x, "zplus", target="softmax"), logits


def predict(model_dir: str | Path, image_path: str | Path, mask_path: str | Path, device: str = "auto", model=None) -> Prediction:
    """Probabilities and the Graz+ z+ map (started from the softmax vector) of one image."""
    dev = resolve_device(device)
    if model is None:
        model, card = load_bundle(model_dir, device=dev)
    else:
        model, card = model
    data, mask, affine = load_input(image_path, mask_path, card)
    x = model_input(data, mask, card, dev)
    with torch.inference_mode():
        relevance, logits = zplus_map(model, x)
    probs = torch.softmax(logits, dim=1)[0].cpu().numpy().astype(np.float64)
    return Prediction(list(card["classes"]), probs, relevance[0, 0].cpu().numpy(), affine)
