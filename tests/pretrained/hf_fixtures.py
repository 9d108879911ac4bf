"""The tiny Hugging Face checkpoints of tests/fixtures/hf, written by
tests/fixtures/make_hf_fixtures.py with transformers; the logits it recorded are the reference.
Nothing here needs torch."""

from __future__ import annotations

import json
import shutil
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


def broken_copy(kind: str, dest: Path) -> Path:
    """A copy of the OLMoE fixture with one fault: a shard missing from its index, a tensor
    of the wrong shape, or a tokenizer not of the model's vocabulary (``vocab=N``: N rows)."""

    def rows(n):
        def edit(weights):
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                w = weights[name]
                weights[name] = np.concatenate([w, np.zeros((n - len(w), w.shape[1]), w.dtype)])
            return weights

        return edit

    if kind.startswith("vocab="):
        n = int(kind.split("=")[1])
        folder = edited_copy("olmoe", dest, config=lambda hf: {**hf, "vocab_size": n},
                             tensors=rows(n))  # fmt: skip
    elif kind == "shape":

        def narrow(weights):
            weights["model.norm.weight"] = weights["model.norm.weight"][:-1]
            return weights

        folder = edited_copy("olmoe", dest, tensors=narrow)
    else:  # a sharded checkpoint, one shard not downloaded
        folder = edited_copy("olmoe", dest)
        weights = load_file(folder / "model.safetensors")
        names = sorted(weights)
        half = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
        for shard in set(half.values()):
            save_file({n: weights[n] for n in names if half[n] == shard}, folder / shard)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": half}))
        (folder / "model.safetensors").unlink()
        (folder / "model-00002-of-00002.safetensors").unlink()
    shutil.copy(FIXTURES / "olmoe" / "tokenizer.json", folder / "tokenizer.json")
    return folder
