"""Cohort cache: bit-identical to in-memory TrainingData, streamed through DataLoader workers."""
import json

import numpy as np
import pytest
import torch

from grazbids.engine import (Architecture, CohortCache, CohortCacheError, Trainer, TrainingData, TrainSettings,
                             build_cohort_cache)
from grazbids.engine.cohort_cache import iterate_batches
from engine_helpers import shortcut_task

ARCH = Architecture((16, 16, 16), n_blocks=2, channels=4)


def _cache_of(data: TrainingData, directory, guidance=False):
    def read(k):
        mask = data.masks[k].numpy() if guidance else data.masks[k, 0].numpy()
        return data.images[k, 0].numpy(), mask
    return build_cohort_cache(directory, data.labels.tolist(), data.n_classes, read, guidance=guidance)


def _data(n=20, guidance=False):
    x, m, y = shortcut_task(n=n, correlation=0.9, seed=3)
    if guidance:  # a non-binary second channel, kept inside the brain
        g = torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) * m
        m = torch.cat([m, g], dim=1)
    return TrainingData(x, m, y, 2)


@pytest.mark.parametrize("guidance", [False, True])
def test_cache_reads_back_bit_identical(tmp_path, guidance):
    data = _data(guidance=guidance)
    cache = _cache_of(data, tmp_path / "cache", guidance)
    assert len(cache) == len(data) and cache.n_classes == 2
    assert torch.equal(cache.labels, data.labels)
    assert torch.equal(cache.images[[3, 1, 7]], data.images[[3, 1, 7]])
    assert torch.equal(cache.masks[np.array([5, 0])], data.masks[np.array([5, 0])])
    assert torch.equal(cache.masks[4, 0], data.masks[4, 0])
    assert torch.equal(cache.masks[[2, 6], :1], data.masks[[2, 6], :1])
    assert torch.equal(cache.images[2:5], data.images[2:5])
    assert cache.images.shape == data.images.shape and cache.masks.shape == data.masks.shape
    # numpy reads the arrays directly
    np.testing.assert_array_equal(np.load(tmp_path / "cache" / "images.npy", mmap_mode="r")[9], data.images[9].numpy())


def test_dataloader_workers_keep_order_and_values(tmp_path):
    data = _data()
    cache = _cache_of(data, tmp_path / "cache")
    batches = [np.array([4, 2]), np.array([9, 0]), np.array([13])]
    direct = list(iterate_batches(data, batches))
    streamed = list(iterate_batches(cache, batches, workers=2))
    assert len(direct) == len(streamed) == 3
    for a, b in zip(direct, streamed):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_training_from_the_cache_is_bit_identical(tmp_path):
    data = _data()
    cache = _cache_of(data, tmp_path / "cache")
    settings = TrainSettings(mode="grazplus", epochs=2, batch_size=2, accumulation_steps=2, learning_rate=1e-3,
                             progress=False, data_workers=2)
    a = Trainer(ARCH, settings).fit(data, np.arange(14), np.arange(14, 20))
    b = Trainer(ARCH, settings).fit(cache, np.arange(14), np.arange(14, 20))
    assert a.history == b.history
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    np.testing.assert_array_equal(a.val_probabilities, b.val_probabilities)


def test_bad_caches_are_refused(tmp_path):
    data = _data(n=6)
    with pytest.raises(CohortCacheError, match="not a readable cohort cache"):
        CohortCache(tmp_path / "missing")
    cache_dir = tmp_path / "cache"
    _cache_of(data, cache_dir)
    with open(cache_dir / "images.npy", "r+b") as handle:  # truncate one sample
        handle.truncate(cache_dir.joinpath("images.npy").stat().st_size - 100)
    with pytest.raises(CohortCacheError, match="truncated"):
        CohortCache(cache_dir)
    meta = json.loads((cache_dir / "cohort.json").read_text())
    (cache_dir / "cohort.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(CohortCacheError, match="not a grazbids-cohort-cache"):
        CohortCache(cache_dir)


def test_build_refuses_bad_samples_and_leaves_nothing(tmp_path):
    data = _data(n=4)

    def negative(k):
        return -data.images[k, 0].numpy() - 1, data.masks[k, 0].numpy()

    with pytest.raises(CohortCacheError, match="non-negative"):
        build_cohort_cache(tmp_path / "cache", data.labels.tolist(), 2, negative)
    assert list(tmp_path.iterdir()) == []  # no half-written cache, no temporary folder


def test_group_load_cohort_streams_the_same_data(tmp_path):
    """The group level's load_cohort through a cache equals the in-memory cohort; a second
    call reuses the cache; a grid mismatch is a clear GroupInputError."""
    import nibabel as nib

    from grazbids.group.cohort import GroupInputError, Sample, load_cohort

    rng = np.random.default_rng(0)
    samples = []
    for k in range(4):
        image = rng.gamma(2.0, 100.0, size=(9, 8, 7)).astype(np.float32)
        mask = np.zeros((9, 8, 7), np.float32)
        mask[2:7, 2:6, 2:5] = 1
        paths = [tmp_path / f"sub-{k}_T1w.nii.gz", tmp_path / f"sub-{k}_mask.nii.gz"]
        for path, volume in zip(paths, (image, mask)):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
        samples.append(Sample(f"{k}", None, paths[0], paths[1], "ab"[k % 2]))
    memory, classes, affine = load_cohort(samples)
    cached, classes_c, affine_c = load_cohort(samples, cache_dir=tmp_path / "work" / "data")
    assert isinstance(cached, CohortCache) and classes == classes_c
    np.testing.assert_array_equal(affine, affine_c)
    assert torch.equal(cached.images[:], memory.images) and torch.equal(cached.masks[:], memory.masks)
    assert torch.equal(cached.labels, memory.labels)
    stamp = (tmp_path / "work" / "data" / "images.npy").stat().st_mtime_ns
    load_cohort(samples, cache_dir=tmp_path / "work" / "data")
    assert (tmp_path / "work" / "data" / "images.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), str(samples[2].image))
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), str(samples[2].mask))
    with pytest.raises(GroupInputError, match="different grids"):
        load_cohort(samples, cache_dir=tmp_path / "work2" / "data")
