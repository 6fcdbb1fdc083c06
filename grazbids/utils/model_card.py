"""Read the input space a model bundle was trained in, from its JSON model card only.

Deliberately independent of ``grazbids.engine`` (no torch import, no weights read, never
unpickles): the CLI refuses a mismatching bundle in milliseconds, before any processing.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..exitcodes import ExitCode, GrazbidsError

CARD_NAME = "model_card.json"
LRP_METHODS = ("epsilon", "alpha1beta0", "alpha2beta1", "alphabeta", "composite")  # may start from the softmax vector


def read_model_input_space(model_path: Path) -> tuple[str, int]:
    """``(input.template, input.resolution)`` of the bundle folder (or its model_card.json)."""
    if not model_path.exists():
        raise GrazbidsError(ExitCode.MISSING_INPUT, f"model bundle {model_path} not found")
    card_path = model_path / CARD_NAME if model_path.is_dir() else model_path
    if card_path.name != CARD_NAME or not card_path.is_file():
        raise GrazbidsError(ExitCode.MISSING_INPUT,
                            f"{model_path} is not a grazbids model bundle: {CARD_NAME} not found in it")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GrazbidsError(ExitCode.BAD_DATA, f"{card_path} is not valid JSON: {err}") from None
    except OSError as err:
        raise GrazbidsError(ExitCode.IO_ERROR, f"cannot read {card_path}: {err.strerror or err}") from None
    space = card.get("input") if isinstance(card, dict) else None
    if not isinstance(space, dict) or "template" not in space or "resolution" not in space:
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"{card_path} lacks input.template / input.resolution; cannot tell which "
                            "template space the model expects")
    try:
        return str(space["template"]), int(space["resolution"])
    except (TypeError, ValueError):
        raise GrazbidsError(ExitCode.BAD_DATA,
                            f"{card_path}: input.resolution {space['resolution']!r} is not an integer") from None


def check_model_space(model_path: Path, template: str, resolution: int) -> None:
    """65 when the bundle was trained on another template grid than this run produces."""
    model_template, model_resolution = read_model_input_space(model_path)
    if (model_template, model_resolution) != (template, resolution):
        raise GrazbidsError(
            ExitCode.BAD_DATA,
            f"model bundle {model_path} was trained on {model_template} at resolution "
            f"{model_resolution}, but this run uses {template} at resolution {resolution}; "
            f"rerun with --template {model_template} --resolution {model_resolution} or use a "
            "model trained on this space",
        )


def check_explain_target(model_path: Path, explain: tuple[str, ...], target: str) -> None:
    """64 when --explain-target is neither 'predicted'/'softmax' nor a class of the model."""
    if not explain or target == "predicted":
        return
    gradient_methods = [m for m in explain if m not in LRP_METHODS]
    if target == "softmax":
        if gradient_methods:
            raise GrazbidsError(ExitCode.USAGE, "--explain-target softmax is defined for the LRP rules only, not "
                                f"{', '.join(gradient_methods)}; use 'predicted' or a class name")
        return
    card_path = model_path / CARD_NAME if model_path.is_dir() else model_path
    classes = [str(c) for c in json.loads(card_path.read_text()).get("classes", [])]
    if target not in classes:
        raise GrazbidsError(ExitCode.USAGE, f"--explain-target {target!r} is not a class of the model "
                            f"{model_path} ({', '.join(classes)}), nor 'predicted' or 'softmax'")
