"""Batched generation in the decode layout against recomputing the whole window for every new
token (``generate_full_window``, the stacked training layout), row by row: the same greedy
tokens and, per step, the same logits, for the tiny config in both dispatch modes, a scanned
model mixing dense and MoE layers, a model with the imported checkpoints' features and imported
fixtures. Then stopping, seeding, the dispatch modes and bfloat16."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import generate as generate_lib
from dynmoe_jax import inference
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.moe import experts
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.pretrained import from_hf
from tests.pretrained.hf_fixtures import FIXTURES
from tests.runs import DISPATCHES, perturbed_params, tiny_config

V, D = 64, 32
PROMPTS = [[5, 17, 3, 42, 8], [9, 1], [60, 2, 33, 33, 7, 12, 40, 1]]
NEW = 9


def _tiny(dispatch: str) -> ModelConfig:
    model = config_lib.resolve(tiny_config(**{"moe.dispatch": dispatch})).model
    return dataclasses.replace(model, vocab_size=V)


def _cfg(moe_kw=None, **kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=16, capacity_factor=None, **(moe_kw or {}))
    return ModelConfig(**{"vocab_size": V, "d_model": D, "num_layers": 4, "num_heads": 4,
                          "d_ff": 48, "moe": moe, **kw})  # fmt: skip


CONFIGS = {
    **{f"tiny_{dispatch}": functools.partial(_tiny, dispatch) for dispatch in DISPATCHES},
    "scanned_moe_every_2": lambda: _cfg(scan_layers=True, moe_every=2, num_layers=5),
    "gqa_qk_norm_bias_shared": lambda: _cfg(
        num_kv_heads=2, qk_norm=True, qkv_bias=True, shared_d_ff=24, shared_gate=True
    ),
}


def _check_rows_against_full_window(cfg, params, prompts=PROMPTS, atol=2e-5):
    graphdef, decode_params = generate_lib.decode_layout(cfg, params)
    gen = generate_lib.generate(graphdef, decode_params, prompts, NEW, keep_logits=True)
    reference = inference.inference_graphdef(cfg)  # the trained layout, no capacity limit
    for b, prompt in enumerate(prompts):
        want_tokens, want_logits, _ = generate_lib.generate_full_window(
            reference, params, prompt, NEW
        )
        assert gen.tokens[b] == want_tokens, b
        np.testing.assert_allclose(gen.logits[b], np.stack(want_logits), atol=atol, rtol=1e-5)
    assert gen.decode_steps == NEW - 1 and gen.tokens_per_s > 0
    return gen


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_greedy_decoding_equals_the_full_window_row_by_row(name):
    cfg = CONFIGS[name]()
    gen = _check_rows_against_full_window(cfg, perturbed_params(cfg))
    assert len({t for row in gen.tokens for t in row}) > 3  # rows do not collapse into one token
    assert all(1 <= e <= cfg.moe.num_experts for row in gen.experts for e in row)


def test_decode_layout_is_per_layer_with_experts_apart():
    cfg = CONFIGS["scanned_moe_every_2"]()
    graphdef, params = generate_lib.decode_layout(cfg, perturbed_params(cfg))
    model = nnx.merge(graphdef, params)
    assert not model.cfg.scan_layers and len(model.blocks) == 5
    assert model.cfg.moe.capacity_factor is None
    moe = model.blocks[1].ffn
    assert experts.is_split(moe.w_gate_EDF.get_value()) and len(moe.w_gate_EDF.get_value()) == 4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_imported_fixture_decodes_like_the_full_window(family):
    # Mixtral: top-2 renormalised; Qwen2-MoE: a shared expert with a sigmoid gate.
    model = from_hf(FIXTURES / family)
    cfg = model.cfg
    params = nnx.split(model)[1]
    prompts = [[3, 10, 4, 7], [12, 1]]
    _check_rows_against_full_window(cfg, params, prompts)
    top_p = from_hf(FIXTURES / family, router="top_p", threshold=0.6)
    _check_rows_against_full_window(top_p.cfg, nnx.split(top_p)[1], prompts)


def test_greedy_tokens_are_the_same_in_every_dispatch_mode():
    tokens = {}
    for dispatch, decode_tokens in [("grouped", None), ("grouped", 0), ("index", 0)]:
        cfg = _cfg({"dispatch": dispatch, "decode_tokens": decode_tokens, "block_size": 4})
        graphdef, params = generate_lib.decode_layout(cfg, perturbed_params(cfg))
        tokens[dispatch, decode_tokens] = generate_lib.generate(
            graphdef, params, PROMPTS, NEW
        ).tokens
    first = tokens["grouped", None]
    assert all(t == first for t in tokens.values()), tokens


def test_rows_stop_before_their_stop_token_and_sampling_is_seeded():
    cfg = _cfg()
    graphdef, params = generate_lib.decode_layout(cfg, perturbed_params(cfg))
    run = functools.partial(generate_lib.generate, graphdef, params, PROMPTS, NEW)
    greedy = run()
    stop = greedy.tokens[0][2]
    stopped = run(stop_id=stop)
    for row, full in zip(stopped.tokens, greedy.tokens, strict=True):
        assert row == (full[: full.index(stop)] if stop in full else full)
    hot = functools.partial(run, temperature=2.0)
    assert hot(seed=0).tokens == hot(seed=0).tokens != hot(seed=1).tokens
    # Row b's draws depend on (seed, step, b): the same prompt alone gives the same row 0.
    alone = generate_lib.generate(graphdef, params, PROMPTS[:1], NEW, temperature=2.0)
    assert alone.tokens[0] == hot(seed=0).tokens[0]


def test_the_loop_ends_once_every_row_has_stopped():
    cfg = _cfg()
    graphdef, params = generate_lib.decode_layout(cfg, perturbed_params(cfg))
    greedy = generate_lib.generate(graphdef, params, PROMPTS[:1], NEW)
    # The first new token unlike every one before it (so its first occurrence): it stops the row.
    tokens = greedy.tokens[0]
    at = next(i for i in range(1, NEW) if tokens[i] not in tokens[:i])
    stopped = generate_lib.generate(graphdef, params, PROMPTS[:1], NEW, stop_id=tokens[at])
    assert stopped.tokens[0] == tokens[:at] and stopped.decode_steps == at


def test_bfloat16_decoding_tracks_the_float32_full_window():
    cfg = _cfg(dtype=jnp.bfloat16, moe_kw={"dtype": jnp.bfloat16})
    params = perturbed_params(cfg)
    graphdef, decode_params = generate_lib.decode_layout(cfg, params)
    assert decode_params["blocks"][0]["ffn"]["w_gate_EDF"].get_value()[0].dtype == jnp.bfloat16
    gen = generate_lib.generate(graphdef, decode_params, PROMPTS[:1], 4, keep_logits=True)
    _, want_logits, _ = generate_lib.generate_full_window(
        inference.inference_graphdef(cfg), params, PROMPTS[0], 1
    )
    np.testing.assert_allclose(gen.logits[0][0], want_logits[0], atol=0.15, rtol=0.05)


def test_prompts_must_be_given():
    cfg = _cfg()
    graphdef, params = generate_lib.decode_layout(cfg, perturbed_params(cfg))
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_lib.generate(graphdef, params, [[1], []], 3)
