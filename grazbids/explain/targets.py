"""Which output an explanation explains."""
from __future__ import annotations

import re

import torch

Target = str | int | torch.Tensor


def class_indices(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Class index per sample: ``"predicted"`` (argmax), an int, or a tensor of indices.

    ``"softmax"`` (the whole softmax vector) only exists for LRP, whose start relevance
    is a vector; the gradient-based methods need one scalar per sample.
    """
    n, n_classes = logits.shape
    if isinstance(target, str):
        if target == "softmax":
            raise ValueError("target 'softmax' is only defined for the LRP methods; use 'predicted' or a class index")
        if target != "predicted":
            raise ValueError(f"unknown target {target!r}: use 'predicted' or a class index")
        return logits.argmax(dim=1)
    index = torch.as_tensor(target, device=logits.device, dtype=torch.long).reshape(-1)
    if index.numel() == 1:
        index = index.expand(n)
    if index.numel() != n:
        raise ValueError(f"{index.numel()} target indices for a batch of {n}")
    if (index < 0).any() or (index >= n_classes).any():
        raise ValueError(f"class index {index.tolist()} out of range for {n_classes} classes")
    return index


def selected(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[i, index[i]]`` for every sample i."""
    return values.gather(1, index[:, None]).squeeze(1)


def method_desc(method: str) -> str:
    """BIDS `desc` value of a method's map (alphanumeric): gradient_x_input -> gradientxinput."""
    return re.sub(r"[^a-zA-Z0-9]", "", method)


def resolve_target(target: str, classes: list[str]) -> str | int:
    """'predicted', 'softmax' or a class name of the model -> explain()'s target."""
    if target in ("predicted", "softmax"):
        return target
    if target in classes:
        return classes.index(target)
    raise ValueError(f"--explain-target {target!r}: not 'predicted', 'softmax' or a class of the model "
                     f"({', '.join(classes)})")
