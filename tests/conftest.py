"""Shared pytest fixtures."""
import os
from pathlib import Path

# The engine's torch.compile'd elementwise kernels cost seconds of compilation per
# process and dtype; the suite runs their eager twin (tests/test_pointwise.py checks
# that both give the same results), CLI subprocesses included.
os.environ.setdefault("GRAZBIDS_NO_COMPILE", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_BIDS = REPO_ROOT.parent / "shared" / "data" / "ds002748"


@pytest.fixture(scope="session")
def real_bids_dir():
    """The real T1w dataset shipped beside the repository (skip when absent)."""
    if not (REAL_BIDS / "dataset_description.json").exists():
        pytest.skip(f"real dataset not found at {REAL_BIDS}")
    return REAL_BIDS


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped with a reason where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none available here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
