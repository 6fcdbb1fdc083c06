"""Training modes and the one place that says what a mode's network sees."""
from __future__ import annotations

from ..config import MODES  # plain, masked, grazplus (the CLI's choices come from the same list)

__all__ = ["MODES", "model_input"]


def model_input(x, mask, mode: str):
    """The network's input in ``mode``: the masked-input CNN only ever sees image x brain
    mask (channel 0 of ``mask``); plain and Graz+ see the whole image. Works on torch
    tensors and numpy arrays of shape (N, C, D, H, W)."""
    return x * mask[:, :1] if mode == "masked" else x
