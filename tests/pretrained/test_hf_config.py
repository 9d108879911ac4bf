"""A checkpoint's config.json as a ModelConfig: the mapping of every family, old and new
spellings, routing and dtype overrides, the fixtures' tokenizers, and one line per config this
code cannot reproduce."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest
import tokenizers

from dynmoe_jax.model.config import Remat
from dynmoe_jax.pretrained import PretrainedError, from_hf, hf_model_config
from dynmoe_jax.validation import ConfigError
from tests.pretrained.hf_fixtures import (
    FAMILY_DIRS,
    FIXTURES,
    edited_copy,
)


def test_config_mapping():
    mixtral, olmoe, qwen = (hf_model_config(FIXTURES / f) for f in FAMILY_DIRS)
    for cfg in (mixtral, olmoe, qwen):
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.d_model) == (4, 2, 32)
        assert cfg.moe.router.value == "top_k" and cfg.moe.top_k == 2
        assert cfg.moe.capacity_factor is None and cfg.norm_eps == 1e-5
    assert mixtral.head_dim == 16 and mixtral.rope_theta == 1e6 and mixtral.moe.renormalize
    assert (mixtral.moe.num_experts, mixtral.moe.d_ff, mixtral.moe_every) == (4, 32, 1)
    assert olmoe.qk_norm and not olmoe.qkv_bias and olmoe.moe.renormalize is False
    assert not olmoe.tie_embeddings and olmoe.shared_d_ff is None
    assert qwen.qkv_bias and qwen.tie_embeddings and qwen.shared_gate
    assert (qwen.shared_d_ff, qwen.moe.d_ff, qwen.d_ff, qwen.moe_every) == (32, 16, 48, 2)
    assert not qwen.qk_norm and qwen.rope_theta == 1e4


def test_top_level_rope_theta(tmp_path):
    """Checkpoints written before transformers 5 keep rope_theta at the top level."""

    def old_style(hf):
        hf.pop("rope_parameters")
        return {**hf, "rope_theta": 5e5}

    path = edited_copy("olmoe", tmp_path, config=old_style)
    assert hf_model_config(path).rope_theta == 5e5


@pytest.mark.parametrize(
    ("step", "mlp_only", "moe_every"),
    [(1, [], 1), (2, [], 2), (1, [0, 2], 2), (2, [0], 2), (4, [], 4)],
)
def test_sparse_step_maps_to_moe_every(tmp_path, step, mlp_only, moe_every):
    def edit(hf):
        return {**hf, "num_hidden_layers": 4, "decoder_sparse_step": step,
                "mlp_only_layers": mlp_only}  # fmt: skip

    assert hf_model_config(edited_copy("qwen2_moe", tmp_path, config=edit)).moe_every == moe_every


def test_overrides_switch_the_router():
    cfg = hf_model_config(
        FIXTURES / "olmoe", router="top_p", threshold=0.5, max_k=3, dispatch="grouped"
    )
    assert (cfg.moe.router.value, cfg.moe.threshold, cfg.moe.max_k) == ("top_p", 0.5, 3)
    assert cfg.moe.dispatch.value == "grouped" and cfg.moe.num_experts == 8


def test_dtype_override():
    cfg = hf_model_config(FIXTURES / "mixtral", dtype="bfloat16", remat="full")
    assert jnp.dtype(cfg.dtype) == jnp.bfloat16 and jnp.dtype(cfg.moe.dtype) == jnp.bfloat16
    assert cfg.remat is Remat.FULL


def test_fixture_tokenizers_match_configs():
    """What the command line reads with the model: vocabulary size and end-of-text id."""
    for family in FAMILY_DIRS:
        tok = tokenizers.Tokenizer.from_file(str(FIXTURES / family / "tokenizer.json"))
        hf = json.loads((FIXTURES / family / "config.json").read_text())
        assert tok.get_vocab_size() == hf["vocab_size"] == 128
        assert tok.token_to_id("<eos>") == hf["eos_token_id"]


def test_unknown_architecture(tmp_path):
    path = edited_copy("mixtral", tmp_path, config=lambda hf: {**hf, "architectures": ["Foo"]})
    with pytest.raises(PretrainedError, match=r"config\.json:architectures=\['Foo'\].*Mixtral"):
        from_hf(path)


def test_missing_config(tmp_path):
    with pytest.raises(PretrainedError, match=r"^path=.* holding config\.json"):
        from_hf(tmp_path)


def test_value_the_decoder_rejects_names_the_checkpoint(tmp_path):
    path = edited_copy("olmoe", tmp_path, config=lambda hf: {**hf, "num_key_value_heads": 3})
    with pytest.raises(PretrainedError, match=r"config\.json: model\.num_kv_heads=3 is invalid"):
        hf_model_config(path)


def test_bad_override_value_names_the_override():
    with pytest.raises(ConfigError, match=r"^moe\.threshold=2\.0 is invalid"):
        hf_model_config(FIXTURES / "olmoe", router="top_p", threshold=2.0)


def test_bad_override_name():
    with pytest.raises(PretrainedError, match=r"^thresold=0\.5 is invalid: .*threshold"):
        hf_model_config(FIXTURES / "olmoe", thresold=0.5)


@pytest.mark.parametrize(
    ("family", "edit", "match"),
    [
        ("mixtral", {"sliding_window": 4096}, r"config\.json:sliding_window=4096"),
        ("qwen2_moe", {"use_sliding_window": True}, r"config\.json:use_sliding_window=True"),
        ("olmoe", {"clip_qkv": 8.0}, r"config\.json:clip_qkv=8\.0"),
        ("qwen2_moe", {"mlp_only_layers": [1]}, r"config\.json:mlp_only_layers=\[1\]"),
        ("olmoe", {"hidden_act": "gelu"}, r"config\.json:hidden_act='gelu'"),
    ],
)
def test_unsupported_config(tmp_path, family, edit, match):
    path = edited_copy(family, tmp_path, config=lambda hf: {**hf, **edit})
    with pytest.raises(PretrainedError, match=match):
        hf_model_config(path)
