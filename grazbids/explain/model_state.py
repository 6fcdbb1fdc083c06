"""Run a caller's model in eval mode without leaving it changed."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Explanations use eval semantics (batch-norm running statistics, no dropout); every
    module's ``training`` flag is restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in flags:
            module.training = training
