"""Reads and writes safetensors checkpoints one tensor at a time, with numpy only.

The format (documented with the ``safetensors`` package): an 8-byte little-endian header
length, a JSON header mapping each tensor name to ``dtype``, ``shape`` and ``data_offsets``
(begin, end, relative to the end of the header), then the raw little-endian bytes.

Each tensor is read at its offset into a fresh array, so the process holds only the tensors it
still uses. A ``safe_open`` kept open for a whole import would instead keep every page of the
memory map it touched resident until it closes, about doubling the import's peak.

Host arrays come from ``host_empty``: anonymous memory maps, returned to the system the moment
the array is dropped. From malloc (``np.empty``), glibc kept freed tensors of a few MiB in its
heap (its mmap threshold rises after each large free), so the resident size kept growing.

A checkpoint is ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file).

``write_safetensors`` writes the same format without torch or the ``safetensors`` package, a
tensor at a time from a producer function, so a checkpoint larger than memory can be made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

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
        data = host_empty(self.shape, self.dtype)
        raw = data.reshape(-1).view(np.uint8)
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            if f.readinto(raw) != raw.size:
                raise SafetensorsError(f"{self.file}: truncated tensor data at byte {self.offset}")
        return data


def host_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous memory map (see the module docstring)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, without reading their data; a SafetensorsError
    naming the file when the header is unreadable or the file is shorter than it announces."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{file}: too short for a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        text = f.read(length)
        if len(text) < length:
            raise SafetensorsError(f"{file}: truncated: its header alone needs {8 + length} "
                                   f"bytes, the file holds {8 + len(text)}")  # fmt: skip
        try:
            header = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{file}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = {name: _tensor_info(file, name, entry, 8 + length) for name, entry in header.items()}
    _check_size(file, header, 8 + length)
    return tensors


def _tensor_info(file: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape, and offsets spanning its bytes."""
    try:
        dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        shape, begin, end = tuple(int(d) for d in shape), int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise SafetensorsError(f"{file}: tensor {name} has no valid dtype, shape and "
                               "data_offsets in the header") from None  # fmt: skip
    if dtype_name not in DTYPES:
        raise SafetensorsError(f"{file}: tensor {name} has dtype {dtype_name} "
                               f"(readable: {', '.join(DTYPES)})")  # fmt: skip
    dtype = np.dtype(DTYPES[dtype_name])
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise SafetensorsError(f"{file}: tensor {name} has data_offsets [{begin}, {end}], "
                               f"which do not hold {dtype_name} {shape}")  # fmt: skip
    return TensorInfo(file=file, dtype=dtype, shape=shape, offset=data_start + begin)


def _check_size(file: Path, header: dict, data_start: int) -> None:
    """A file cut short (an interrupted download or copy) fails here, before any tensor is
    read, rather than in the middle of an import."""
    needed = data_start + max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    size = file.stat().st_size
    if size < needed:
        raise SafetensorsError(f"{file}: truncated: its header announces {needed} bytes, "
                               f"the file holds {size}")  # fmt: skip


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, single-file or sharded, by name."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = _shards(index)
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise SafetensorsError(f"{directory}: holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:  # an unfinished download: said before any header is read
        raise SafetensorsError(f"{directory / missing[0]}: missing, though {INDEX_FILE} lists "
                               f"it ({len(missing)} of {len(files)} shards missing)")  # fmt: skip
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        file_tensors = read_header(directory / name)
        for tensor in file_tensors.keys() & tensors.keys():
            raise SafetensorsError(f"{directory / name}: tensor {tensor} is also in "
                                   f"{tensors[tensor].file.name}")  # fmt: skip
        tensors.update(file_tensors)
    return tensors


def _shards(index: Path) -> list[str]:
    """The shard files an index lists (its ``weight_map`` values), each once."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SafetensorsError(f"{index}: not a JSON object with a weight_map of tensor name "
                               "-> shard file") from None  # fmt: skip
    if not files or not all(isinstance(f, str) and f for f in files):
        raise SafetensorsError(f"{index}: its weight_map names no shard file")
    return files


# ----------------------------------------------------------------------------- writing

DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER_ALIGNMENT = 8  # the header is padded with spaces so the data starts 8-byte aligned

Spec = tuple[Sequence[int], DTypeLike]  # a tensor's shape and dtype, as the caller gives them
Announced = dict[str, tuple[tuple[int, ...], np.dtype]]  # the same, as the header states them


def write_safetensors(
    path: str | Path,
    specs: Mapping[str, Spec],
    produce: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a safetensors file of the tensors ``specs`` announces (name -> (shape, dtype)),
    in that order, calling ``produce(name)`` for each one's values only when its turn comes,
    so a checkpoint larger than memory can be written: the writer holds one tensor at a time.

    The header is written first, from ``specs`` alone; each produced array must then match its
    announced shape and dtype (a ``SafetensorsError`` otherwise). The file is written under a
    temporary name in the same folder and renamed at the end, so an error or a crash never
    leaves a partial file under ``path``. Returns ``path``.
    """
    path = Path(path)
    header, expected = _header(specs, metadata)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(temporary, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name, (shape, dtype) in expected.items():
                f.write(_checked(name, produce(name), shape, dtype).reshape(-1).view(np.uint8))
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _header(
    specs: Mapping[str, Spec], metadata: Mapping[str, str] | None
) -> tuple[bytes, Announced]:
    """The padded JSON header, and each tensor's (shape, dtype) as normalised."""
    header: dict = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise SafetensorsError(f"metadata {key!r}: {value!r} (keys and values must be "
                                       "strings)")  # fmt: skip
        header["__metadata__"] = dict(metadata)
    expected, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        shape, dtype = _spec(name, shape, dtype)
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, end]}  # fmt: skip
        expected[name], offset = (shape, dtype), end
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % HEADER_ALIGNMENT), expected


def _spec(name: str, shape: Sequence[int], dtype) -> tuple[tuple[int, ...], np.dtype]:
    if not isinstance(name, str) or name == "__metadata__":
        raise SafetensorsError(f"tensor name {name!r} (a string other than '__metadata__')")
    dims = tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        raise SafetensorsError(f"tensor {name}: shape {dims} (integers >= 0)")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype not in DTYPE_NAMES:
        allowed = ", ".join(str(d) for d in DTYPE_NAMES)
        raise SafetensorsError(f"tensor {name}: dtype {dtype} (writable: {allowed})")
    return tuple(int(d) for d in dims), dtype


def _checked(name: str, array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``array`` contiguous, if it is what the header announced for ``name``."""
    got = np.asarray(array)
    if got.shape != shape or got.dtype != dtype:
        raise SafetensorsError(f"tensor {name}: produced {got.dtype} {got.shape}, but the "
                               f"header announced {dtype} {shape}")  # fmt: skip
    return np.ascontiguousarray(got)
