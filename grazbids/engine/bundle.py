"""Model bundles: weights in safetensors + a JSON model card. Loading never unpickles."""
from __future__ import annotations

import json
import math
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
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
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


# more parameters than this is no grazbids network (the default Graz+ CNN has ~60k): a card
# that asks for it is refused before anything is allocated
MAX_PARAMETERS = 500_000_000


class ModelBundleError(ValueError):
    """A model bundle that cannot be used; the message names the file and the problem."""


class ModelBundleMissing(ModelBundleError):
    """A bundle file that does not exist (exit code 66 rather than 65 on the command line)."""


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


def check_bundle(directory: str | Path) -> dict:
    """Check card and weights against each other without reading or allocating any weight:
    the card's network is built on the meta device, the weights' names and shapes come from
    the safetensors header. Returns the card; raises ModelBundleError (ModelBundleMissing)."""
    from ..utils.safetensors_header import WeightsFileError, read_header

    path = Path(directory)
    if not path.exists():
        raise ModelBundleMissing(f"{path / CARD_NAME}: model card not found (the model bundle {path} does not exist)")
    bundle_dir = path if path.is_dir() else path.parent
    if not (bundle_dir / CARD_NAME).is_file():
        raise ModelBundleMissing(f"{bundle_dir / CARD_NAME}: model card not found (a bundle is a folder with "
                                 f"{WEIGHTS_NAME} and {CARD_NAME})")
    card = read_card(bundle_dir)
    weights_path = bundle_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ModelBundleMissing(f"{weights_path}: weights file not found")
    try:
        stored = read_header(weights_path)
    except WeightsFileError as err:
        raise ModelBundleError(str(err)) from None
    try:
        arch = Architecture.from_dict(card["architecture"])
        with torch.device("meta"):  # shapes only: an absurd card cannot allocate terabytes
            meta_state = build_model(arch).state_dict()
        expected = {k: tuple(v.shape) for k, v in meta_state.items()}
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise ModelBundleError(f"{bundle_dir / CARD_NAME}: invalid architecture ({err})") from None
    n_parameters = sum(math.prod(shape) for shape in expected.values())
    if n_parameters > MAX_PARAMETERS:
        raise ModelBundleError(f"{bundle_dir / CARD_NAME}: the architecture asks for {n_parameters:,} parameters "
                               f"(more than {MAX_PARAMETERS:,}); not a grazbids network")
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k} has shape {stored[k][1]}, expected {shape}"
                 for k, shape in expected.items() if k in stored and stored[k][1] != shape]
    problems += [f"{k} is {dtype}, expected a float type"
                 for k, (dtype, _) in stored.items()
                 if k in expected and meta_state[k].is_floating_point() and dtype not in FLOAT_DTYPES]
    if problems:
        raise ModelBundleError(f"{weights_path}: weights do not match the architecture in {CARD_NAME}: "
                               + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return card


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from the card and load the safetensors weights into it."""
    path = Path(directory)
    card = check_bundle(path)  # nothing is allocated before card and weights agree
    bundle_dir = path if path.is_dir() else path.parent
    weights_path = bundle_dir / WEIGHTS_NAME
    model = build_model(Architecture.from_dict(card["architecture"]))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelBundleError(f"{weights_path}: cannot read weights ({err})") from None
    model.load_state_dict(state)
    model.eval()
    return model.to(device), card
