"""Where each parameter lies in a checkpoint: the fused expert layout, tensors missing, of the
wrong shape, unknown or ignorable, each against transformers' logits or one line naming it."""

from __future__ import annotations

import numpy as np
import pytest

from dynmoe_jax.pretrained import PretrainedError, from_hf
from tests.pretrained.hf_fixtures import (
    edited_copy,
    forward,
    transformers_logits,
)


def _fused(weights: dict) -> dict:
    """The experts of each layer in transformers' in-memory layout: gate_up_proj [E, 2F, D]
    and down_proj [E, D, F]."""
    out = dict(weights)
    for layer in range(2):
        moe = f"model.layers.{layer}.mlp.experts"
        names = [f"{moe}.{e}.{{}}.weight" for e in range(8)]
        gate = [out.pop(n.format("gate_proj")) for n in names]
        up = [out.pop(n.format("up_proj")) for n in names]
        out[f"{moe}.gate_up_proj"] = np.stack(
            [np.concatenate(p) for p in zip(gate, up, strict=True)]
        )
        out[f"{moe}.down_proj"] = np.stack([out.pop(n.format("down_proj")) for n in names])
    return out


def test_fused_expert_layout(tmp_path):
    tokens, expected = transformers_logits("olmoe")
    path = edited_copy("olmoe", tmp_path, tensors=_fused)
    np.testing.assert_allclose(forward(from_hf(path), tokens)[0], expected, atol=1e-4)


def test_missing_tensor(tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    path = edited_copy(
        "olmoe", tmp_path, tensors=lambda w: {k: v for k, v in w.items() if k != name}
    )
    with pytest.raises(PretrainedError, match=rf"model\.safetensors:{name}='missing'.*\(16, 32\)"):
        from_hf(path)


def test_wrong_shape(tmp_path):
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    path = edited_copy("olmoe", tmp_path, tensors=lambda w: {**w, name: w[name][:8]})
    with pytest.raises(PretrainedError, match=rf"{name}\.shape=\(8, 32\).*\(16, 32\)"):
        from_hf(path)


def test_unknown_tensor(tmp_path):
    name = "model.layers.0.mlp.extra.weight"
    path = edited_copy("olmoe", tmp_path, tensors=lambda w: {**w, name: np.zeros(3, np.float32)})
    with pytest.raises(PretrainedError, match=rf"model\.safetensors:{name}="):
        from_hf(path)


def test_ignorable_tensor_is_ignored(tmp_path):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    path = edited_copy("olmoe", tmp_path, tensors=lambda w: {**w, name: np.zeros(4, np.float32)})
    tokens, expected = transformers_logits("olmoe")
    np.testing.assert_allclose(forward(from_hf(path), tokens)[0], expected, atol=1e-4)
