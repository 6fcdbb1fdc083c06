"""Simulator bundles: ``<classifier bundle>/simulator/`` with ``simulator.safetensors`` and
``simulator_card.json``, written together (atomic folder swap).

The card names the classifier it was trained against by the SHA-256 of its
``model.safetensors``; loading refuses any other classifier. The card also holds the
SHA-256 of the simulator weights, so a truncated or swapped weights file is caught
before any tensor is read. Loading never unpickles.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..engine.bundle import WEIGHTS_NAME, ModelBundleError
from ..utils.atomic import atomic_directory
from .network import ConditionalUNet, SimulatorArchitecture

SIMULATOR_DIR = "simulator"
SIMULATOR_WEIGHTS = "simulator.safetensors"
SIMULATOR_CARD = "simulator_card.json"
SIMULATOR_FORMAT = "grazbids-counterfactual-simulator"
FORMAT_VERSION = 1


class SimulatorBundleError(ModelBundleError):
    """A simulator bundle that cannot be used (missing, truncated, for another classifier)."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def classifier_hash(classifier_dir: str | Path) -> str:
    """Content hash of a classifier bundle: SHA-256 of its weights file."""
    weights = Path(classifier_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelBundleError(f"{weights}: classifier weights not found")
    return sha256_file(weights)


def simulator_dir(classifier_dir: str | Path) -> Path:
    return Path(classifier_dir) / SIMULATOR_DIR


def has_simulator(classifier_dir: str | Path) -> bool:
    return (simulator_dir(classifier_dir) / SIMULATOR_CARD).is_file()


def save_simulator(classifier_dir: str | Path, simulator: ConditionalUNet, card: dict) -> Path:
    """Write the simulator beside the classifier; replaces an older simulator at once."""
    classifier_dir = Path(classifier_dir)
    target = simulator_dir(classifier_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in simulator.state_dict().items()}
    with atomic_directory(target) as tmp:
        save_file(state, str(tmp / SIMULATOR_WEIGHTS), metadata={"format": SIMULATOR_FORMAT})
        full = {
            "format": SIMULATOR_FORMAT,
            "format_version": FORMAT_VERSION,
            "grazbids_version": __version__,
            "architecture": simulator.arch.to_dict(),
            "weights_sha256": sha256_file(tmp / SIMULATOR_WEIGHTS),
            **card,
        }
        (tmp / SIMULATOR_CARD).write_text(json.dumps(full, indent=2) + "\n")
    return target


def read_simulator_card(classifier_dir: str | Path) -> dict:
    path = simulator_dir(classifier_dir) / SIMULATOR_CARD
    if not path.is_file():
        raise SimulatorBundleError(f"{path}: no simulator card (train one with python -m grazbids.counterfactual train)")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SimulatorBundleError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(card, dict) or card.get("format") != SIMULATOR_FORMAT:
        raise SimulatorBundleError(f"{path}: not a grazbids simulator card")
    if card.get("format_version", 0) > FORMAT_VERSION:
        raise SimulatorBundleError(f"{path}: format {card['format_version']} is newer than this grazbids understands")
    for key in ("architecture", "weights_sha256", "classifier"):
        if key not in card:
            raise SimulatorBundleError(f"{path}: card lacks {key!r}")
    return card


def check_classifier(card: dict, classifier_dir: str | Path, where: Path) -> None:
    """Refuse a simulator trained against another classifier."""
    expected = card["classifier"].get("sha256")
    actual = classifier_hash(classifier_dir)
    if expected != actual:
        raise SimulatorBundleError(
            f"{where}: this simulator was trained against the classifier with weights SHA-256 {expected}, "
            f"but {Path(classifier_dir) / WEIGHTS_NAME} has {actual}; train a simulator for this classifier "
            "(python -m grazbids.counterfactual train) or use the classifier it was made for")


def load_simulator(classifier_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ConditionalUNet, dict]:
    """The simulator stored in a classifier bundle, checked against that classifier."""
    folder = simulator_dir(classifier_dir)
    card = read_simulator_card(classifier_dir)
    check_classifier(card, classifier_dir, folder / SIMULATOR_CARD)
    weights = folder / SIMULATOR_WEIGHTS
    if not weights.is_file():
        raise SimulatorBundleError(f"{weights}: simulator weights not found")
    if sha256_file(weights) != card["weights_sha256"]:
        raise SimulatorBundleError(f"{weights}: content differs from the SHA-256 in {SIMULATOR_CARD} "
                                   "(truncated or replaced); retrain the simulator")
    try:
        model = ConditionalUNet(SimulatorArchitecture.from_dict(card["architecture"]))
    except (TypeError, ValueError, KeyError) as err:
        raise SimulatorBundleError(f"{folder / SIMULATOR_CARD}: invalid architecture ({err})") from None
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise SimulatorBundleError(f"{weights}: cannot load the weights ({str(err).splitlines()[0][:300]})") from None
    model.eval()
    return model.to(device), card
