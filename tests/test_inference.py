"""Cached decoding against recomputing the whole window for every new token (the sampler's
former method, ``inference.generate_full_window``): the same greedy tokens and, per step,
the same logits, for the tiny config, a scanned model mixing dense and MoE layers, and a
model with the imported checkpoints' features. Then the sample flags' checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import inference, sample_checks
from dynmoe_jax.configs import tiny
from dynmoe_jax.model import Decoder, ModelConfig
from dynmoe_jax.moe import MoEConfig
from dynmoe_jax.sample_checks import MAX_NEW_TOKENS
from dynmoe_jax.validation import ConfigError

V, D = 64, 32
PROMPT = [5, 17, 3, 42, 8]
NEW = 9


def _tiny() -> ModelConfig:
    return config_lib.model_config(tiny.get_config(), V)


def _cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, d_model=D, d_ff=16, capacity_factor=None)
    return ModelConfig(**{"vocab_size": V, "d_model": D, "num_layers": 4, "num_heads": 4,
                          "d_ff": 48, "moe": moe, **kw})  # fmt: skip


CONFIGS = {
    "tiny": _tiny,
    "scanned_moe_every_2": lambda: _cfg(scan_layers=True, moe_every=2, num_layers=5),
    "gqa_qk_norm_bias_shared": lambda: _cfg(
        num_kv_heads=2, qk_norm=True, qkv_bias=True, shared_d_ff=24, shared_gate=True
    ),
}


def _graph_and_params(cfg: ModelConfig):
    model = Decoder(cfg, rngs=nnx.Rngs(3))
    # Biases and norm scales start at 0 and 1: perturb every parameter so that each counts.
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    # Decoding, like the sampler, runs the graph without capacity limits.
    return inference.inference_graphdef(cfg), jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_greedy_decoding_equals_recomputing_the_window(name):
    cfg = CONFIGS[name]()
    graphdef, params = _graph_and_params(cfg)
    gen = inference.generate(graphdef, params, PROMPT, NEW, keep_logits=True)
    want_tokens, want_logits, _ = inference.generate_full_window(graphdef, params, PROMPT, NEW)
    assert gen.tokens == want_tokens
    assert len(set(want_tokens)) > 2  # the prompt does not collapse into one repeated token
    for got, want in zip(gen.logits, want_logits, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert gen.decode_steps == NEW - 1 and gen.tokens_per_s > 0
    if cfg.moe is not None:
        assert all(1 <= e <= cfg.moe.num_experts for e in gen.experts)


def test_decode_writes_the_cache_at_the_current_position_only():
    cfg = _cfg(num_kv_heads=2)
    graphdef, params = _graph_and_params(cfg)
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1, 8)
    assert cache.k_LBUJH.shape == (4, 1, 8, 2, D // 4)
    _, _, cache = model.decode(jnp.asarray([PROMPT[:3]]), cache, 0)
    _, _, after = model.decode(jnp.asarray([[PROMPT[3]]]), cache, 3)
    for before_LBUJH, after_LBUJH in zip(cache, after, strict=True):
        changed_U = np.any(np.asarray(before_LBUJH != after_LBUJH), axis=(0, 1, 3, 4))
        assert changed_U.tolist() == [False, False, False, True, False, False, False, False]


def test_sampling_stops_before_the_stop_token_and_is_seeded():
    graphdef, params = _graph_and_params(_cfg())
    greedy = inference.generate(graphdef, params, PROMPT, NEW)
    stop = greedy.tokens[2]
    stopped = inference.generate(graphdef, params, PROMPT, NEW, stop_id=stop)
    assert stopped.tokens == greedy.tokens[: greedy.tokens.index(stop)]
    run = functools.partial(inference.generate, graphdef, params, PROMPT, NEW, temperature=2.0)
    assert run(seed=0).tokens == run(seed=0).tokens != run(seed=1).tokens


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


def test_sample_workdir_checks_its_arguments_before_reading_the_workdir(tmp_path):
    config = tiny.get_config()
    with pytest.raises(ConfigError, match="^max_new_tokens=0 is invalid"):
        inference.sample_workdir(config, tmp_path / "absent", "The", max_new_tokens=0)
    with pytest.raises(ConfigError, match="^temperature=-1 is invalid"):
        inference.sample_workdir(config, tmp_path / "absent", "The", temperature=-1)
    assert not (tmp_path / "absent").exists()
