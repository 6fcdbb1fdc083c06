"""CUDA paths (marker ``gpu``: skipped without a CUDA device; run with ``-m gpu``).

The same code runs on CPU in test_lrp.py / test_cohort_cache.py; here the device
copies must agree with the CPU results."""
import numpy as np
import pytest
import torch

from grazbids.engine import Architecture, Trainer, TrainSettings, build_cohort_cache, masked_relevance, zplus_heatmap
from engine_helpers import shortcut_task, tiny_model

pytestmark = pytest.mark.gpu


def test_masked_relevance_and_gradients_on_cuda_match_cpu():
    model = tiny_model(shape=(12, 10, 9), n_blocks=2)
    x = torch.rand(2, 1, 12, 10, 9, dtype=torch.float64)
    mask = (torch.rand(2, 2, 12, 10, 9, dtype=torch.float64) > 0.4).double()
    _, inside, total = masked_relevance(model, x, mask)
    grads = torch.autograd.grad(inside.sum(), list(model.parameters()))
    cuda_model = tiny_model(shape=(12, 10, 9), n_blocks=2).cuda()
    _, inside_c, total_c = masked_relevance(cuda_model, x.cuda(), mask.cuda())
    grads_c = torch.autograd.grad(inside_c.sum(), list(cuda_model.parameters()))
    torch.testing.assert_close(inside_c.cpu(), inside, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total_c.cpu(), total, rtol=1e-9, atol=1e-12)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-8, atol=1e-12)


def test_heatmap_on_cuda_matches_cpu():
    model = tiny_model(shape=(12, 10, 9), n_blocks=2)
    x = torch.rand(2, 1, 12, 10, 9, dtype=torch.float64)
    with torch.inference_mode():
        R, _ = zplus_heatmap(model, x)
        R_c, _ = zplus_heatmap(model.cuda(), x.cuda())
    torch.testing.assert_close(R_c.cpu(), R, rtol=1e-9, atol=1e-14)


def test_training_on_cuda_from_a_cohort_cache(tmp_path):
    x, m, y = shortcut_task(n=12, correlation=0.9, seed=1)
    cache = build_cohort_cache(tmp_path / "cache", y.tolist(), 2, lambda k: (x[k, 0].numpy(), m[k, 0].numpy()))
    settings = TrainSettings(mode="grazplus", epochs=2, batch_size=2, accumulation_steps=1, learning_rate=1e-3,
                             progress=False, device="cuda", data_workers=2)
    result = Trainer(Architecture((16, 16, 16), n_blocks=2, channels=4), settings).fit(cache, np.arange(8),
                                                                                        np.arange(8, 12))
    assert len(result.history) == 2
    assert np.isfinite([row["train_loss"] for row in result.history]).all()
