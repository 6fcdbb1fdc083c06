"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

Why: every full-resolution activation of a 3D CNN (one 8-channel 2 mm volume pair is
~70 MB) is larger than glibc's largest mmap threshold (32 MB), so each one is a fresh
``mmap`` whose pages fault in, zeroed, on first write and are unmapped again on free. On
the benchmark machine those page faults took about half of a CPU training step
(benchmarks/bench_engine.py: plain step 0.25 -> 0.13 s, Graz+ step 0.59 -> 0.38 s).
With mmap disabled for heap chunks and trimming off, freed blocks are reused directly.
The cost: the process keeps its peak heap until it exits (memory is not returned
early), which is what a training or inference process wants anyway.

Set ``GRAZBIDS_SYSTEM_MALLOC=1`` to leave the C library's defaults alone.
"""
from __future__ import annotations

import ctypes
import os
import platform

# from glibc's malloc.h, and its defaults
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024

_applied = False


def _mallopt(*settings: tuple[int, int]) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    global _applied
    if not _applied and not os.environ.get("GRAZBIDS_SYSTEM_MALLOC"):
        _applied = _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def mmap_large_buffers(threshold: int = 1 << 20) -> bool:
    """For data-reader processes (forked from a trainer, so they inherit the settings
    above): every buffer over ``threshold`` straight from mmap and unmapped on free.
    A reader allocates one sample buffer after another between other objects; served
    from the heap they fragment it (measured: resident memory growing with the cohort),
    and there is no large-activation churn to save page faults on."""
    return _mallopt((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_MMAP_THRESHOLD, threshold),
                    (M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD))
