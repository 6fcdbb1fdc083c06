"""Read and check a safetensors file's header without reading (or allocating) any tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the raw bytes. Checking that the byte ranges
fit the dtypes and shapes and exactly cover the rest of the file finds truncated, empty,
padded and foreign (pickle, zip) files from the first few kilobytes, so a bad model bundle
or checkpoint is refused before any work starts, and absurd shapes never reach an
allocator. Deliberately torch-free.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

# bytes per element of every safetensors dtype
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# first bytes of formats that must never be loaded as weights (they can execute code)
FOREIGN_MAGIC = {b"\x80": "a Python pickle", b"PK\x03\x04": "a zip archive (a torch.save checkpoint?)"}


class WeightsFileError(ValueError):
    """A weights file that is not a complete safetensors file; the message names it."""


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` of a complete, consistent safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            start = handle.read(8)
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
            raw = handle.read(length) if length is not None and 8 + length <= size and length <= MAX_HEADER_BYTES else b""
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: not found") from None
    except OSError as err:
        raise WeightsFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise WeightsFileError(f"{path}: is empty (0 bytes)")
    for magic, what in FOREIGN_MAGIC.items():
        if start.startswith(magic):
            raise WeightsFileError(f"{path}: is {what}, not a safetensors file; grazbids never loads "
                                   "pickled weights (they can run arbitrary code)")
    if length is None or length > MAX_HEADER_BYTES or 8 + length > size:
        raise WeightsFileError(f"{path}: not a safetensors file, or truncated (header length "
                               f"{length if length is not None else '?'} bytes, file {size} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsFileError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: not a safetensors file (header is not a JSON object)")
    return _check_entries(path, header, size - 8 - length)


def _check_entries(path: Path, header: dict, data_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    tensors = {}
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(shape)
            valid = (dtype in DTYPE_SIZES and all(isinstance(n, int) and n >= 0 for n in shape)
                     and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise WeightsFileError(f"{path}: tensor {name!r} has an invalid header entry {entry!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]  # Python ints: an absurd shape cannot overflow
        if end - begin != expected:
            raise WeightsFileError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) needs {expected:,} "
                                   f"bytes but its byte range holds {end - begin:,}")
        tensors[name] = (dtype, shape)
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):  # the tensors must tile the data exactly, as safetensors writes them
        if begin != position:
            raise WeightsFileError(f"{path}: tensor byte ranges overlap or leave gaps (at byte {position:,})")
        position = end
    if position > data_bytes:
        raise WeightsFileError(f"{path}: is truncated: the header promises {position:,} bytes of tensors, "
                               f"the file holds {data_bytes:,}")
    if position < data_bytes:
        raise WeightsFileError(f"{path}: has {data_bytes - position:,} bytes after the last tensor "
                               "(not written by safetensors; corrupt?)")
    return tensors
