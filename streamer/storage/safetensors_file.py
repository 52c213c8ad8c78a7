"""Safetensors headers and a streaming writer, without loading tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}`` (offsets relative to the end of the header), then the raw bytes.
Reading only the header lets repack and tests locate any tensor's bytes without touching the rest;
writing the header first lets the synthetic generator stream tens of GB to disk tensor by tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.errors import CheckpointError

# safetensors dtype code -> bytes per element
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}

# Refuse absurd headers before allocating them (a corrupt length field would otherwise ask for TBs).
MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(CheckpointError):
    """A safetensors file is unreadable, truncated or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. ``offset`` is absolute within ``path``."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Reads a safetensors header and checks every tensor lies within the file.

    Returns:
        (tensors by name, the ``__metadata__`` dict).

    Raises:
        SafetensorsError: naming the file and what is wrong with it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError(
                f"{path}: header length {header_len} does not fit in a {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor '{name}': malformed header entry {entry!s:.80}") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"{path}: tensor '{name}' has unknown dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise SafetensorsError(
                f"{path}: tensor '{name}' spans {end - begin} bytes, but {dtype}{list(shape)} "
                f"needs {expected}"
            )
        if begin < 0 or data_start + end > size:
            raise SafetensorsError(
                f"{path}: tensor '{name}' data ends at byte {data_start + end}, beyond the file's "
                f"{size} bytes (truncated download?)"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
    return tensors, metadata


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]


class SafetensorsWriter:
    """A pre-sized safetensors file whose tensors are filled in place, in any order and in pieces.

    The header matches ``mx.save_safetensors``: names sorted, compact JSON, entry keys
    ``data_offsets, dtype, shape``, ``{"format": "mlx"}`` metadata; data packed in name order. Writing
    at final offsets lets a generator emit one expert of a stacked tensor at a time.
    """

    def __init__(self, path: str | os.PathLike, specs: dict[str, tuple[str, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "mlx"}}
        offset = 0
        self._offsets = {}
        for name in sorted(specs):
            dtype, shape = specs[name]
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {"data_offsets": [offset, offset + nbytes], "dtype": dtype, "shape": list(shape)}
            self._offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        self._data_start = 8 + len(raw)
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, offset_in_tensor: int, data: bytes | memoryview) -> None:
        os.pwrite(self._file.fileno(), data, self._data_start + self._offsets[name] + offset_in_tensor)

    def close(self) -> None:
        self._file.close()
