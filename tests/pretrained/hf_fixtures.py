"""The tiny Hugging Face checkpoints of tests/fixtures/hf, written by
tests/fixtures/make_hf_fixtures.py with transformers; the logits it recorded are the reference.
Nothing here needs torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
FAMILY_DIRS = ("mixtral", "olmoe", "qwen2_moe")

# One compiled call (op-by-op execution compiles every primitive and was ~3x slower here).
forward = nnx.jit(lambda module, inputs: module(inputs))


def transformers_logits(family: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's tokens [B, T] and the logits transformers gave for them [B, T, V]."""
    ref = np.load(FIXTURES / family / "logits.npz")
    return ref["tokens"], ref["logits"]


def edited_copy(family: str, dest: Path, config=None, tensors=None) -> Path:
    """A copy of a fixture whose config (dict -> dict) or tensors (dict -> dict) are edited."""
    src = FIXTURES / family
    dest.mkdir(parents=True, exist_ok=True)
    hf = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config(hf) if config else hf))
    weights = load_file(src / "model.safetensors")
    save_file(tensors(weights) if tensors else weights, dest / "model.safetensors")
    return dest
