"""Pick the torch device for --device auto|cpu|cuda."""
from __future__ import annotations

import torch


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--device cuda was requested but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
                "Check the NVIDIA driver (nvidia-smi), run Singularity/Apptainer with --nv or "
                "Docker with --gpus all, or use --device auto to fall back to the CPU."
            )
        return torch.device("cuda")
    raise ValueError(f"unknown device {choice!r}: use auto, cpu or cuda")
