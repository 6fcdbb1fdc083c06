"""Which output an explanation explains."""
from __future__ import annotations

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
