"""Model bundles: weights in safetensors + a JSON model card. Loading never unpickles."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..utils.atomic import atomic_directory
from .architectures import build_model
from .model import Architecture

WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "model_card.json"
BUNDLE_FORMAT = "grazbids-model"
FORMAT_VERSION = 1

# dotted paths every model card must have
REQUIRED_FIELDS = (
    "format",
    "format_version",
    "grazbids_version",
    "architecture",
    "architecture.input_shape",
    "architecture.n_classes",
    "mode",
    "seed",
    "classes",
    "target_column",
    "input.template",
    "input.resolution",
    "input.grid_shape",
    "input.intensity_normalisation",
    "training_data",
)


class ModelBundleError(ValueError):
    """A model bundle that cannot be used; the message names the file and the problem."""


def _lookup(card: dict, dotted: str):
    node = card
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


def save_bundle(directory: str | Path, model: torch.nn.Module, card: dict) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/model_card.json`` atomically."""
    card = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "grazbids_version": __version__,
        "architecture": model.arch.to_dict(),
        **card,
    }
    validate_card(card, Path(directory) / CARD_NAME)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": BUNDLE_FORMAT})
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return Path(directory)


def validate_card(card: dict, where: Path) -> None:
    missing = []
    for field in REQUIRED_FIELDS:
        try:
            _lookup(card, field)
        except KeyError:
            missing.append(field)
    if missing:
        raise ModelBundleError(f"{where}: model card lacks required field(s): {', '.join(missing)}")
    if card["format"] != BUNDLE_FORMAT:
        raise ModelBundleError(f"{where}: not a grazbids model card (format={card['format']!r})")
    if card["format_version"] > FORMAT_VERSION:
        raise ModelBundleError(
            f"{where}: model card format {card['format_version']} is newer than this grazbids "
            f"({__version__}) understands ({FORMAT_VERSION}); upgrade grazbids"
        )
    if len(card["classes"]) != card["architecture"]["n_classes"]:
        raise ModelBundleError(
            f"{where}: {len(card['classes'])} class labels but the network has "
            f"{card['architecture']['n_classes']} outputs"
        )
    if list(card["input"]["grid_shape"]) != list(card["architecture"]["input_shape"]):
        raise ModelBundleError(f"{where}: input.grid_shape differs from architecture.input_shape")


def read_card(directory: str | Path) -> dict:
    """Read and validate the JSON model card only (cheap; used to check compatibility)."""
    path = Path(directory)
    card_path = path / CARD_NAME if path.is_dir() else path.with_name(CARD_NAME)
    if not card_path.is_file():
        raise ModelBundleError(f"{card_path}: model card not found (a bundle is a folder with {WEIGHTS_NAME} and {CARD_NAME})")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelBundleError(f"{card_path}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise ModelBundleError(f"{card_path}: model card must be a JSON object")
    validate_card(card, card_path)
    return card


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from the card and load the safetensors weights into it."""
    path = Path(directory)
    bundle_dir = path if path.is_dir() else path.parent
    card = read_card(bundle_dir)
    weights_path = bundle_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ModelBundleError(f"{weights_path}: weights file not found")
    try:
        arch = Architecture.from_dict(card["architecture"])
        model = build_model(arch)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelBundleError(f"{bundle_dir / CARD_NAME}: invalid architecture ({err})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelBundleError(f"{weights_path}: cannot read weights ({err})") from None
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ModelBundleError(f"{weights_path}: weights do not match the architecture: " + "; ".join(problems[:5]))
    model.load_state_dict(state)
    model.eval()
    return model.to(device), card
