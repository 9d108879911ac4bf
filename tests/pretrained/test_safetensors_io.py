"""The streaming safetensors writer against the ``safetensors`` package and our own reader;
the reader on every dtype and on a checkpoint sharded over files."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dynmoe_jax.pretrained import from_hf
from dynmoe_jax.pretrained.safetensors_io import (
    SINGLE_FILE,
    SafetensorsError,
    checkpoint_tensors,
    write_safetensors,
)
from tests.pretrained.hf_fixtures import FIXTURES, forward, transformers_logits


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w_float32": rng.standard_normal((3, 5), np.float32),
        "w_bfloat16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "w_float16": rng.standard_normal(7).astype(np.float16),
        "ids_int64": rng.integers(-(2**40), 2**40, (4,), np.int64),
        "ids_int32": rng.integers(-5, 5, (2, 2), np.int32),
        "bytes_uint8": rng.integers(0, 255, (9,), np.uint8),
        "mask_bool": rng.random((3,)) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def _write(path, arrays, metadata=None, produce=None):
    specs = {name: (a.shape, a.dtype) for name, a in arrays.items()}
    return write_safetensors(path, specs, produce or arrays.__getitem__, metadata)


def test_round_trip_through_the_safetensors_package(tmp_path):
    arrays = _arrays()
    path = _write(tmp_path / "t.safetensors", arrays, {"format": "np", "note": "made here"})
    loaded = load_file(path)
    assert set(loaded) == set(arrays)
    for name, want in arrays.items():
        assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
        np.testing.assert_array_equal(loaded[name], want)
    with safe_open(path, "np") as f:
        assert f.metadata() == {"format": "np", "note": "made here"}
    # The header is padded to 8 bytes and the data follows it back to back.
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    assert len(raw) == 8 + length + sum(a.nbytes for a in arrays.values())
    header = json.loads(raw[8 : 8 + length])
    begin = sum(a.nbytes for a in list(arrays.values())[: list(arrays).index("scalar")])
    assert header["scalar"] == {"dtype": "F32", "shape": [], "data_offsets": [begin, begin + 4]}
    assert header["w_bfloat16"]["dtype"] == "BF16" and header["mask_bool"]["dtype"] == "BOOL"


def test_read_back_through_our_reader(tmp_path):
    arrays = _arrays()
    _write(tmp_path / SINGLE_FILE, arrays)
    tensors = checkpoint_tensors(tmp_path)
    assert list(tensors) == list(arrays)
    for name, want in arrays.items():
        got = tensors[name].read()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)


def test_producer_is_called_once_per_tensor_in_header_order(tmp_path):
    arrays = _arrays()
    calls = []

    def produce(name):
        calls.append(name)
        return arrays[name]

    _write(tmp_path / "t.safetensors", arrays, produce=produce)
    assert calls == list(arrays)


SHAPE_ERROR = "produced float32 (3, 4), but the header announced float32 (3, 5)"


@pytest.mark.parametrize(
    "wrong, message",
    [
        (np.zeros((3, 4), np.float32), SHAPE_ERROR),
        (np.zeros((3, 5), np.float64), "produced float64 (3, 5)"),
    ],
)
def test_a_wrong_tensor_raises_and_leaves_no_file(tmp_path, wrong, message):
    arrays = _arrays()
    path = tmp_path / "t.safetensors"

    def produce(name):
        return wrong if name == "w_float32" else arrays[name]

    with pytest.raises(SafetensorsError, match=re.escape("tensor w_float32: " + message)):
        _write(path, arrays, produce=produce)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the temporary one


def test_a_producer_error_leaves_an_older_file_in_place(tmp_path):
    path = _write(tmp_path / "t.safetensors", {"a": np.ones(2, np.float32)})
    before = path.read_bytes()

    def fail(name):
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        write_safetensors(path, {"a": ((2,), np.float32)}, fail)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "specs, metadata, message",
    [
        ({"c": ((2,), np.complex64)}, None, "tensor c: dtype complex64 \\(writable: float64"),
        ({"c": ((2,), "no such dtype")}, None, "tensor c: dtype None"),
        ({"c": ((2, -1), np.float32)}, None, "tensor c: shape \\(2, -1\\)"),
        ({"__metadata__": ((2,), np.float32)}, None, "tensor name '__metadata__'"),
        ({"c": ((2,), np.float32)}, {"step": 3}, "metadata 'step': 3"),
    ],
)
def test_bad_specs_are_refused_before_anything_is_written(tmp_path, specs, metadata, message):
    with pytest.raises(SafetensorsError, match=message):
        write_safetensors(tmp_path / "t.safetensors", specs, lambda n: 1 / 0, metadata)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file_is_one_line_naming_it(tmp_path, keep):
    arrays = _arrays()
    path = _write(tmp_path / SINGLE_FILE, arrays)
    size = path.stat().st_size
    os.truncate(path, int(size * keep))
    with pytest.raises(SafetensorsError) as err:
        checkpoint_tensors(tmp_path)
    needed = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0] if keep < 0.9 else size
    assert re.fullmatch(
        rf"{re.escape(str(path))}: truncated: its header (alone needs|announces) {needed} bytes, "
        f"the file holds {int(size * keep)}",
        str(err.value),
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__ is False
    assert err.value.__context__ is None  # raised on its own: no chained traceback


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [2]}, "tensor a has no valid dtype, shape and data_offsets"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"\[0, 8\], which do not hold"),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "dtype C64 \\(readable: F64"),
    ],
)
def test_a_bad_header_entry_is_one_line_naming_it(tmp_path, entry, message):
    header = json.dumps({"a": entry}).encode()
    (tmp_path / SINGLE_FILE).write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(SafetensorsError, match=f"^{re.escape(str(tmp_path / SINGLE_FILE))}: "):
        checkpoint_tensors(tmp_path)
    with pytest.raises(SafetensorsError, match=message):
        checkpoint_tensors(tmp_path)


def test_reads_every_dtype_as_safetensors_does(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(4,)).astype(np.float16),
        "f32": rng.normal(size=(2, 3, 4)).astype(np.float32),
        "i64": np.arange(7, dtype=np.int64),
        "scalar": np.array(3.0, np.float32),
    }
    save_file(arrays, tmp_path / "model.safetensors", metadata={"format": "np"})
    tensors = checkpoint_tensors(tmp_path)
    for name, want in load_file(tmp_path / "model.safetensors").items():
        got = tensors[name].read()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))


def test_sharded_checkpoint_files(tmp_path):
    """model-0000x-of-0000y.safetensors with model.safetensors.index.json."""
    weights = load_file(FIXTURES / "qwen2_moe" / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, tmp_path / file)
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "qwen2_moe" / "config.json", tmp_path)
    tokens, expected = transformers_logits("qwen2_moe")
    np.testing.assert_allclose(forward(from_hf(tmp_path), tokens)[0], expected, atol=1e-4)
