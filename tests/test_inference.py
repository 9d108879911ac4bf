"""Batched generation in the decode layout against recomputing the whole window for every new
token (``generate_full_window``, the stacked training layout), row by row: the same greedy
tokens and, per step, the same logits, for the tiny config, a scanned model mixing dense and
MoE layers, a model with the imported checkpoints' features and imported fixtures. Then
stopping, seeding, the dispatch modes, bfloat16 and the sample flags' checks."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import inference, sample_checks
from dynmoe_jax.configs import tiny
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.model.decoder import Decoder
from dynmoe_jax.moe import experts
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.pretrained import from_hf
from dynmoe_jax.sample_checks import MAX_NEW_TOKENS
from dynmoe_jax.validation import ConfigError

V, D = 64, 32
PROMPTS = [[5, 17, 3, 42, 8], [9, 1], [60, 2, 33, 33, 7, 12, 40, 1]]
NEW = 9
FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def _tiny() -> ModelConfig:
    return dataclasses.replace(config_lib.resolve(tiny.get_config()).model, vocab_size=V)


def _cfg(moe_kw=None, **kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=16, capacity_factor=None, **(moe_kw or {}))
    return ModelConfig(**{"vocab_size": V, "d_model": D, "num_layers": 4, "num_heads": 4,
                          "d_ff": 48, "moe": moe, **kw})  # fmt: skip


CONFIGS = {
    "tiny": _tiny,
    "scanned_moe_every_2": lambda: _cfg(scan_layers=True, moe_every=2, num_layers=5),
    "gqa_qk_norm_bias_shared": lambda: _cfg(
        num_kv_heads=2, qk_norm=True, qkv_bias=True, shared_d_ff=24, shared_gate=True
    ),
}


def _params(cfg: ModelConfig):
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    # Biases and norm scales start at 0 and 1: perturb every parameter so that each counts.
    _, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def _check_rows_against_full_window(cfg, params, prompts=PROMPTS, atol=2e-5):
    graphdef, decode_params = inference.decode_layout(cfg, params)
    gen = inference.generate(graphdef, decode_params, prompts, NEW, keep_logits=True)
    reference = inference.inference_graphdef(cfg)  # the trained layout, no capacity limit
    for b, prompt in enumerate(prompts):
        want_tokens, want_logits, _ = inference.generate_full_window(reference, params, prompt, NEW)
        assert gen.tokens[b] == want_tokens, b
        np.testing.assert_allclose(gen.logits[b], np.stack(want_logits), atol=atol, rtol=1e-5)
    assert gen.decode_steps == NEW - 1 and gen.tokens_per_s > 0
    return gen


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_greedy_decoding_equals_the_full_window_row_by_row(name):
    cfg = CONFIGS[name]()
    gen = _check_rows_against_full_window(cfg, _params(cfg))
    assert len({t for row in gen.tokens for t in row}) > 3  # rows do not collapse into one token
    assert all(1 <= e <= cfg.moe.num_experts for row in gen.experts for e in row)


def test_decode_layout_is_per_layer_with_experts_apart():
    cfg = CONFIGS["scanned_moe_every_2"]()
    graphdef, params = inference.decode_layout(cfg, _params(cfg))
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
        graphdef, params = inference.decode_layout(cfg, _params(cfg))
        tokens[dispatch, decode_tokens] = inference.generate(graphdef, params, PROMPTS, NEW).tokens
    first = tokens["grouped", None]
    assert all(t == first for t in tokens.values()), tokens


def test_decode_writes_each_row_at_its_own_position():
    cfg = _cfg(num_kv_heads=2)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    decode = jax.jit(lambda p, tokens, cache, start: nnx.merge(graphdef, p).decode(
        tokens, cache, start))  # fmt: skip
    cache = nnx.merge(graphdef, params).init_cache(2, 8)
    assert cache.k_LBUJH.shape == (4, 2, 8, 2, D // 4)
    _, _, cache = decode(params, jnp.asarray([PROMPTS[0][:3], PROMPTS[1] + [0]]), cache, 0)
    _, _, after = decode(params, jnp.asarray([[4], [5]]), cache, jnp.asarray([3, 2]))
    for before_LBUJH, after_LBUJH in zip(cache, after, strict=True):
        changed_BU = np.any(np.asarray(before_LBUJH != after_LBUJH), axis=(0, 3, 4))
        assert np.flatnonzero(changed_BU[0]).tolist() == [3]
        assert np.flatnonzero(changed_BU[1]).tolist() == [2]


def test_rows_stop_before_their_stop_token_and_sampling_is_seeded():
    cfg = _cfg()
    graphdef, params = inference.decode_layout(cfg, _params(cfg))
    run = functools.partial(inference.generate, graphdef, params, PROMPTS, NEW)
    greedy = run()
    stop = greedy.tokens[0][2]
    stopped = run(stop_id=stop)
    for row, full in zip(stopped.tokens, greedy.tokens, strict=True):
        assert row == (full[: full.index(stop)] if stop in full else full)
    hot = functools.partial(run, temperature=2.0)
    assert hot(seed=0).tokens == hot(seed=0).tokens != hot(seed=1).tokens
    # Row b's draws depend on (seed, step, b): the same prompt alone gives the same row 0.
    alone = inference.generate(graphdef, params, PROMPTS[:1], NEW, temperature=2.0)
    assert alone.tokens[0] == hot(seed=0).tokens[0]


def test_the_loop_ends_once_every_row_has_stopped():
    cfg = _cfg()
    graphdef, params = inference.decode_layout(cfg, _params(cfg))
    greedy = inference.generate(graphdef, params, PROMPTS[:1], NEW)
    stop = greedy.tokens[0][1]
    stopped = inference.generate(graphdef, params, PROMPTS[:1], NEW, stop_id=stop)
    assert stopped.tokens[0] == greedy.tokens[0][:1] and stopped.decode_steps == 1


def test_bfloat16_decoding_tracks_the_float32_full_window():
    cfg = _cfg(dtype=jnp.bfloat16, moe_kw={"dtype": jnp.bfloat16})
    params = _params(cfg)
    graphdef, decode_params = inference.decode_layout(cfg, params)
    assert decode_params["blocks"][0]["ffn"]["w_gate_EDF"].get_value()[0].dtype == jnp.bfloat16
    gen = inference.generate(graphdef, decode_params, PROMPTS[:1], 4, keep_logits=True)
    _, want_logits, _ = inference.generate_full_window(
        inference.inference_graphdef(cfg), params, PROMPTS[0], 1
    )
    np.testing.assert_allclose(gen.logits[0][0], want_logits[0], atol=0.15, rtol=0.05)


def test_prompts_must_be_given():
    cfg = _cfg()
    graphdef, params = inference.decode_layout(cfg, _params(cfg))
    with pytest.raises(ValueError, match="at least one prompt"):
        inference.generate(graphdef, params, [[1], []], 3)


@pytest.mark.parametrize("value", [0, -3, MAX_NEW_TOKENS + 1, 2.5, True])
def test_max_new_tokens_out_of_range_is_one_line(value):
    sample_checks.check_max_new_tokens(MAX_NEW_TOKENS)
    with pytest.raises(ConfigError) as err:
        sample_checks.check_max_new_tokens(value)
    assert str(err.value) == (
        f"max_new_tokens={value!r} is invalid: allowed an integer in 1..{MAX_NEW_TOKENS}"
    )


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "hot"])
def test_bad_temperature_is_one_line(value):
    sample_checks.check_temperature(0.0)
    with pytest.raises(ConfigError) as err:
        sample_checks.check_temperature(value)
    assert str(err.value) == f"temperature={value!r} is invalid: allowed a number >= 0 (0 = greedy)"


def test_prompts_file_is_checked(tmp_path):
    (tmp_path / "ok.txt").write_text("In the beginning\n\n  \nAnd God said\n")
    assert sample_checks.read_prompts(tmp_path / "ok.txt") == ["In the beginning", "And God said"]
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    cases = {
        tmp_path / "absent.txt": "a text file with one prompt per line",
        tmp_path: "a text file with one prompt per line",
        tmp_path / "blank.txt": "a file with at least one non-blank line",
        tmp_path / "latin1.txt": "a readable UTF-8 text file (UnicodeDecodeError)",
    }
    for path, allowed in cases.items():
        with pytest.raises(ConfigError) as err:
            sample_checks.read_prompts(path)
        assert str(err.value) == f"--prompts_file={str(path)!r} is invalid: allowed {allowed}"


def test_sample_workdir_checks_its_arguments_before_reading_the_workdir(tmp_path):
    config = tiny.get_config()
    with pytest.raises(ConfigError, match="^max_new_tokens=0 is invalid"):
        inference.sample_workdir(config, tmp_path / "absent", "The", max_new_tokens=0)
    with pytest.raises(ConfigError, match="^temperature=-1 is invalid"):
        inference.sample_workdir(config, tmp_path / "absent", "The", temperature=-1)
    with pytest.raises(ConfigError, match="^--prompts_file="):
        inference.sample_file(config, tmp_path / "absent", tmp_path / "none.txt", 4)
    assert not (tmp_path / "absent").exists()
