"""Memory and epoch time of a streamed cohort (CohortCache) as the cohort grows.

    python benchmarks/bench_cohort.py [--cache-dir DIR] [--workers 2] [--sizes-2mm 40 400]
                                      [--sizes-4mm 40 400 4000] [--keep]

For each grid and cohort size: writes a cache of synthetic participants (a brain-shaped
ellipsoid of random intensities and its mask) with ``build_cohort_cache``, then, in a
fresh process, runs one epoch the way the trainer does (the trainer's shuffled order,
batch 2, ``iterate_batches`` with DataLoader workers) and reports the peak resident
memory of that process and its workers together (sampled every 20 ms from /proc) and
the epoch time. The epoch reads every sample and sums it (no network: the point is the
data path; a Graz+ step takes ~0.5 s per batch on 2 CPU cores, far longer than a read).
For comparison the in-memory ``TrainingData`` of today's ``load_cohort`` is measured
where it fits in --memory-budget-mb (its memory is N x 8.7 MB at 2 mm).

Disk: a participant takes 5.4 MB at 2 mm (float32 image + uint8 mask), so 4000 at 2 mm
need 21.6 GB; on the development machine (78 GB free, ~50 MB/s with fsync) that is ~8
minutes of writing per run, so the 4000 cohort runs on the 4 mm grid (49x58x49, 0.7 MB
a participant, 2.8 GB) and the 2 mm grid runs 40 and 400. Caches are deleted after use.
The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

GRIDS = {"2mm": (97, 115, 97), "4mm": (49, 58, 49)}

EPOCH_CODE = """
import sys, time, numpy as np, torch
from grazbids.engine import CohortCache, TrainingData
from grazbids.engine.cohort_cache import iterate_batches
from grazbids.engine.trainer import _batches, _epoch_order
kind, path, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
cache = CohortCache(path)
data = cache
if kind == "memory":  # today's load_cohort: every sample stacked in RAM
    data = TrainingData(cache.images[:], cache.masks[:], cache.labels, cache.n_classes)
order = _epoch_order(np.arange(len(cache)), 42, 1)
start = time.perf_counter()
total = 0.0
for x, m, y in iterate_batches(data, list(_batches(order, 2)), workers):
    total += float(x.sum()) + float(m.sum())
print(time.perf_counter() - start, total)
"""


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (MB), from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as handle:
                total += next(int(l.split()[1]) for l in handle if l.startswith("VmRSS"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    stack += [int(c) for c in handle.read().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def run_epoch(kind: str, cache: Path, workers: int) -> tuple[float, float]:
    """(epoch seconds, peak RSS MB of the process tree) of one epoch in a fresh process."""
    proc = subprocess.Popen([sys.executable, "-c", EPOCH_CODE, kind, str(cache), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss_mb(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"epoch process failed: {err[-2000:]}")
    return float(out.split()[0]), peak


def synthetic_sample(k: int, grid) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in grid]
    d, h, w = np.meshgrid(*axes, indexing="ij")
    radius = 0.75 + 0.1 * rng.random()
    mask = ((d / radius) ** 2 + (h / radius) ** 2 + (w / radius) ** 2 <= 1).astype(np.float32)
    image = mask * rng.random(grid, dtype=np.float32)
    return image, mask


def build(directory: Path, n: int, grid) -> float:
    from grazbids.engine import build_cohort_cache

    start = time.perf_counter()
    build_cohort_cache(directory, [k % 2 for k in range(n)], 2, lambda k: synthetic_sample(k, grid))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where caches are written (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes-2mm", type=int, nargs="*", default=[40, 400])
    parser.add_argument("--sizes-4mm", type=int, nargs="*", default=[40, 400, 4000])
    parser.add_argument("--memory-budget-mb", type=float, default=2048,
                        help="also measure today's in-memory loading when it needs less than this")
    parser.add_argument("--keep", action="store_true", help="keep the caches")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_cohort_", dir=args.cache_dir))
    summary = {"workers": args.workers, "peak_rss_mb": {}, "epoch_s": {}, "build_s": {}, "in_memory_peak_rss_mb": {},
               "in_memory_epoch_s": {}, "mb_per_participant": {}}
    try:
        for name, sizes in (("2mm", args.sizes_2mm), ("4mm", args.sizes_4mm)):
            grid = GRIDS[name]
            per_sample = (np.prod(grid) * 5) / 2**20
            summary["mb_per_participant"][name] = round(float(per_sample), 2)
            for n in sizes:
                directory = root / f"{name}_{n}"
                free = shutil.disk_usage(root).free / 2**30
                if free < n * per_sample / 1024 * 1.5 + 5:
                    print(f"{name} {n}: skipped, {free:.0f} GB free on disk", file=sys.stderr)
                    continue
                seconds = build(directory, n, grid)
                epoch, peak = run_epoch("cache", directory, args.workers)
                key = f"{name}_{n}" if name != "2mm" else str(n)
                summary["build_s"][key] = round(seconds, 1)
                summary["epoch_s"][key] = round(epoch, 2)
                summary["peak_rss_mb"][key] = round(peak, 1)
                line = f"{name} grid {grid}, {n:5d} participants: cache built in {seconds:6.1f} s; streamed epoch " \
                       f"{epoch:6.2f} s, peak RSS {peak:7.1f} MB (main + {args.workers} workers)"
                # in memory: float32 image and mask, stacked from a list (twice, briefly)
                if n * np.prod(grid) * 8 * 2 / 2**20 <= args.memory_budget_mb:
                    m_epoch, m_peak = run_epoch("memory", directory, 0)
                    summary["in_memory_epoch_s"][key] = round(m_epoch, 2)
                    summary["in_memory_peak_rss_mb"][key] = round(m_peak, 1)
                    line += f"; in memory (today): epoch {m_epoch:6.2f} s, peak RSS {m_peak:7.1f} MB"
                print(line, flush=True)
                if not args.keep:
                    shutil.rmtree(directory)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for name, sizes in (("2mm", args.sizes_2mm), ("4mm", args.sizes_4mm)):
        keys = [f"{name}_{n}" if name != "2mm" else str(n) for n in sizes]
        keys = [k for k in keys if k in summary["peak_rss_mb"]]
        if len(keys) > 1:
            growth = summary["peak_rss_mb"][keys[-1]] / summary["peak_rss_mb"][keys[0]]
            summary[f"growth_factor_{name}"] = round(growth, 3)
            print(f"{name}: peak RSS grows {growth:.2f}x from {keys[0]} to {keys[-1]} participants "
                  f"(cohort grows {int(keys[-1].split('_')[-1]) / int(keys[0].split('_')[-1]):.0f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
