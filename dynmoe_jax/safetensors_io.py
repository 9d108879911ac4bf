"""Reads safetensors checkpoints one tensor at a time, with numpy only.

The format (documented with the ``safetensors`` package): an 8-byte little-endian header
length, a JSON header mapping each tensor name to ``dtype``, ``shape`` and ``data_offsets``
(begin, end, relative to the end of the header), then the raw little-endian bytes.

Each tensor is read with ``np.fromfile`` at its offset into a fresh array, so the process holds
only the tensors it still uses. A memory map (``safe_open``) would keep every page it touched
resident while the file stays open, and the checkpoint's pages would add up to its whole size.

A checkpoint is ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte offset."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    def read(self) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        data = np.fromfile(self.file, dtype=self.dtype, count=count, offset=self.offset)
        if data.size != count:
            raise SafetensorsError(f"{self.file}: truncated tensor data at byte {self.offset}")
        return data.reshape(self.shape)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, without reading their data."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{file}: too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{file}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            allowed = ", ".join(DTYPES)
            raise SafetensorsError(f"{file}: tensor {name} has dtype {entry['dtype']} "
                                   f"(readable: {allowed})")  # fmt: skip
        begin, _ = entry["data_offsets"]
        tensors[name] = TensorInfo(
            file=file,
            dtype=np.dtype(DTYPES[entry["dtype"]]),
            shape=tuple(entry["shape"]),
            offset=8 + length + begin,
        )
    return tensors


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, single-file or sharded, by name."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise SafetensorsError(f"{directory}: holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        file_tensors = read_header(directory / name)
        for tensor in file_tensors.keys() & tensors.keys():
            raise SafetensorsError(f"{directory / name}: tensor {tensor} is also in "
                                   f"{tensors[tensor].file.name}")  # fmt: skip
        tensors.update(file_tensors)
    return tensors
