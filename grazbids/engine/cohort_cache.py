"""A cohort on disk: training data whose memory does not grow with the number of scans.

``TrainingData`` holds every image and mask in RAM (4.3 MB each per participant at
2 mm, ~35 MB at 1 mm). A ``CohortCache`` is a folder written once per run::

    cohort.json      n, grid, labels, number of classes, mask channels
    images.npy       (N, 1, D, H, W) float32, the normalised images
    brain.npy        (N, D, H, W) uint8, the brain masks (binary: 1 byte a voxel)
    guidance.npy     (N, D, H, W) float32, optional guidance masks (any value in [0, 1])

(standard ``.npy`` files: ``numpy.load(path, mmap_mode="r")`` opens them.) Reading a
sample is one positioned read per array into a fresh buffer (no shared memory map, whose
touched pages would count towards the reader's resident memory and stay there); a
``torch.utils.data.DataLoader`` with worker processes reads the next batches while the
model trains on this one. The values are bit-identical to the in-memory ``TrainingData``
(float32 images stored as they are; a binary brain mask is exact in uint8).

The cache is written to a temporary folder and renamed, so a crash never leaves a
half-written cache under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .allocator import mmap_large_buffers

FORMAT = "grazbids-cohort-cache"
FORMAT_VERSION = 1


class CohortCacheError(ValueError):
    """A cache folder that is missing, incomplete or not a grazbids cohort cache."""


def _write_header(handle, dtype, shape) -> int:
    np.lib.format.write_array_header_1_0(
        handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return handle.tell()


def build_cohort_cache(
    directory: str | Path,
    labels: Sequence[int],
    n_classes: int,
    read_sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
    *,
    guidance: bool = False,
    replace: bool = True,
) -> "CohortCache":
    """Write a cache for ``len(labels)`` samples; ``read_sample(k)`` returns sample k's image
    (D, H, W) and mask ((D, H, W) brain mask, or (2, D, H, W) brain + guidance with
    ``guidance=True``). One sample is in memory at a time. Returns the opened cache.
    ``replace=False`` keeps a complete cache that another process renamed into place first."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(labels)
    files, grid = {}, None
    try:
        for k in range(n):
            image, mask = read_sample(k)
            image = np.asarray(image, dtype=np.float32)
            mask = np.asarray(mask, dtype=np.float32)
            brain, extra = (mask[0], mask[1]) if guidance else (mask, None)
            if grid is None:
                grid = image.shape
                files["images"] = open(tmp / "images.npy", "wb")
                _write_header(files["images"], np.float32, (n, 1, *grid))
                files["brain"] = open(tmp / "brain.npy", "wb")
                _write_header(files["brain"], np.uint8, (n, *grid))
                if guidance:
                    files["guidance"] = open(tmp / "guidance.npy", "wb")
                    _write_header(files["guidance"], np.float32, (n, *grid))
            if image.shape != grid or brain.shape != grid:
                raise CohortCacheError(f"sample {k}: grid {image.shape} / mask {brain.shape} differs from {grid}")
            if (image < 0).any():
                raise CohortCacheError(f"sample {k}: z+ LRP needs non-negative inputs: normalise images first")
            if not np.isin(brain, (0.0, 1.0)).all():
                raise CohortCacheError(f"sample {k}: the brain mask must be binary (0/1)")
            files["images"].write(np.ascontiguousarray(image).tobytes())
            files["brain"].write(np.ascontiguousarray(brain, dtype=np.uint8).tobytes())
            if guidance:
                files["guidance"].write(np.ascontiguousarray(extra, dtype=np.float32).tobytes())
        for handle in files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "n": n, "grid": list(grid or ()),
                "labels": [int(v) for v in labels], "n_classes": int(n_classes), "guidance": bool(guidance)}
        (tmp / "cohort.json").write_text(json.dumps(meta))
        if directory.exists() and replace:
            shutil.rmtree(directory)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "cohort.json").exists():
                raise
            shutil.rmtree(tmp)  # another process (e.g. another torchrun rank) finished the same cache first
    except BaseException:
        for handle in files.values():
            handle.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CohortCache(directory)


def open_or_build_cohort_cache(directory: str | Path, labels: Sequence[int], n_classes: int,
                               read_sample: Callable[[int], tuple[np.ndarray, np.ndarray]], *,
                               guidance: bool = False) -> "CohortCache":
    """The cache in ``directory`` when it is complete and holds these labels (a resumed run
    reuses it; name the folder after the cohort's content), else a freshly built one."""
    directory = Path(directory)
    if (directory / "cohort.json").exists():
        try:
            cache = CohortCache(directory)
            if cache.labels.tolist() == [int(v) for v in labels] and cache.masks.shape[1] == (2 if guidance else 1):
                return cache
        except CohortCacheError:
            pass
        shutil.rmtree(directory, ignore_errors=True)
    return build_cohort_cache(directory, labels, n_classes, read_sample, guidance=guidance, replace=False)


def mean_image(data, index) -> torch.Tensor:
    """Mean of ``data.images[index]`` over the samples, (1, 1, D, H, W). In memory: torch's
    float32 mean (as before); from a cache: summed one sample at a time in float64 (memory
    flat in the cohort size; may differ from the float32 mean in the last bits)."""
    index = np.asarray(index).reshape(-1)
    if not isinstance(data, CohortCache):
        return data.images[index].mean(0, keepdim=True)
    total = torch.zeros(data.images.shape[1:], dtype=torch.float64)
    for k in index:
        total += data.read_image(int(k))
    return (total / max(len(index), 1)).to(torch.float32)[None]


class _Array:
    """One ``.npy`` file read sample by sample with positioned reads."""

    def __init__(self, path: Path, dtype, sample_shape: tuple[int, ...], n: int):
        self._fd, self._pid = None, None
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, stored = read_header(handle)
            self.offset = handle.tell()
        if stored != np.dtype(dtype) or fortran or tuple(shape) != (n, *sample_shape):
            raise CohortCacheError(f"{path}: holds {stored} {shape}, expected {np.dtype(dtype)} {(n, *sample_shape)}")
        if path.stat().st_size != self.offset + n * int(np.prod(sample_shape)) * np.dtype(dtype).itemsize:
            raise CohortCacheError(f"{path}: truncated (size does not match its header)")
        self.path, self.dtype, self.sample_shape = path, np.dtype(dtype), sample_shape
        self.item_bytes = int(np.prod(sample_shape)) * self.dtype.itemsize

    def read(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # one descriptor per (worker) process
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        out = np.empty(self.sample_shape, dtype=self.dtype)
        view = memoryview(out).cast("B")
        done = 0
        while done < self.item_bytes:
            got = os.preadv(self._fd, [view[done:]], self.offset + k * self.item_bytes + done)
            if got == 0:
                raise CohortCacheError(f"{self.path}: unexpected end of file at sample {k}")
            done += got
        return out

    def __getstate__(self):  # descriptors do not travel to worker processes
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


class CohortCache(torch.utils.data.Dataset):
    """A cohort cache opened for reading: a map-style dataset of (image, mask, label) and a
    drop-in for ``TrainingData`` (``images``, ``masks``, ``labels``, ``n_classes``):
    ``cache.images[index]`` reads those samples (index: int, slice, list or array)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "cohort.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise CohortCacheError(f"{meta_path}: not a readable cohort cache ({err})") from err
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise CohortCacheError(f"{meta_path}: not a {FORMAT} version {FORMAT_VERSION}")
        n, grid = int(meta["n"]), tuple(int(v) for v in meta["grid"])
        self.grid, self.n_classes = grid, int(meta["n_classes"])
        self.labels = torch.tensor(meta["labels"], dtype=torch.int64)
        self._images = _Array(self.directory / "images.npy", np.float32, (1, *grid), n)
        self._brain = _Array(self.directory / "brain.npy", np.uint8, grid, n)
        self._guidance = _Array(self.directory / "guidance.npy", np.float32, grid, n) if meta["guidance"] else None
        self.images = _SampleView(self, "image", (1, *grid))
        self.masks = _SampleView(self, "mask", (2 if self._guidance else 1, *grid))

    def __len__(self) -> int:
        return len(self.labels)

    def read_image(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self._images.read(k))

    def read_mask(self, k: int) -> torch.Tensor:
        brain = torch.from_numpy(self._brain.read(k)).to(torch.float32)
        if self._guidance is None:
            return brain[None]
        return torch.stack([brain, torch.from_numpy(self._guidance.read(k))])

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = int(k)
        return self.read_image(k), self.read_mask(k), self.labels[k]


class _SampleView:
    """``cache.images`` / ``cache.masks``: indexing reads the samples (first index) and
    applies the rest of the index to the stacked tensor, like a tensor would."""

    def __init__(self, cache: CohortCache, kind: str, sample_shape: tuple[int, ...]):
        self._cache, self._kind = cache, kind
        self.shape = torch.Size((len(cache), *sample_shape))

    def _read(self, k: int) -> torch.Tensor:
        return self._cache.read_image(k) if self._kind == "image" else self._cache.read_mask(k)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)) or (torch.is_tensor(first) and first.dim() == 0):
            return self._read(int(first))[rest] if rest else self._read(int(first))
        index = range(len(self._cache))[first] if isinstance(first, slice) else np.asarray(first).reshape(-1)
        stacked = torch.stack([self._read(int(k)) for k in index]) if len(index) else \
            torch.empty((0, *self.shape[1:]))
        return stacked[(slice(None), *rest)] if rest else stacked


def _stack(samples):
    images, masks, labels = zip(*samples)
    return torch.stack(images), torch.stack(masks), torch.stack(labels)


def _worker_init(_worker_id: int) -> None:
    """Large buffers straight from mmap in reader processes (glibc: M_MMAP_THRESHOLD = 1 MB).

    Otherwise glibc raises its mmap threshold after the first freed sample buffer (or, with
    the engine's ``keep_freed_memory``, never uses mmap) and serves the next ones from the
    heap, which fragments: measured +4 MB resident per batch per worker, without end. A
    fixed threshold keeps the workers flat."""
    mmap_large_buffers(1 << 20)


def iterate_batches(data, batches: Iterable[np.ndarray], workers: int = 0, pin_memory: bool = False):
    """(images, masks, labels) of each batch of sample indices, in the order given.

    In-memory ``TrainingData`` is indexed directly; a ``CohortCache`` is read through a
    ``DataLoader`` whose ``workers`` processes read ahead (same batches, same order, same
    values either way)."""
    batches = [np.asarray(b) for b in batches]
    if not isinstance(data, CohortCache):
        for batch in batches:
            yield data.images[batch], data.masks[batch], data.labels[batch]
        return
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=[b.tolist() for b in batches], num_workers=workers, collate_fn=_stack,
        pin_memory=pin_memory, prefetch_factor=2 if workers else None, worker_init_fn=_worker_init)
    yield from loader
