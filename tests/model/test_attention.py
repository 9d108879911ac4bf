"""Attention against a per-head float64 loop (grouped-query heads, biases, q/k norm), the
implementation chosen per platform, dtype and shape, bfloat16 attention and its backward pass,
and attention over a decoding cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax.model import attention
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.model.decoder import Attention
from tests.model.decoders import (
    IMPORTED,
    D,
    T,
    f64,
    model_config,
    rms_norm_ref,
    rope_ref,
)


def _attention_ref(attn, cfg: ModelConfig, x_BTD) -> np.ndarray:
    """Per-batch, per-head float64 loop; query head n reads key/value head n // (N / J)."""
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_width
    x = f64(x_BTD)
    b, t, d = x.shape
    q = x @ f64(attn.wq_DNH).reshape(d, n * h)
    key = x @ f64(attn.wk_DJH).reshape(d, k * h)
    value = x @ f64(attn.wv_DJH).reshape(d, k * h)
    if cfg.qkv_bias:
        q, key = q + f64(attn.bq_NH).ravel(), key + f64(attn.bk_JH).ravel()
        value = value + f64(attn.bv_JH).ravel()
    if cfg.qk_norm:  # over the whole projection, before RoPE
        q = rms_norm_ref(q, f64(attn.q_norm.scale_D), cfg.norm_eps)
        key = rms_norm_ref(key, f64(attn.k_norm.scale_D), cfg.norm_eps)
    q, key, value = q.reshape(b, t, n, h), key.reshape(b, t, k, h), value.reshape(b, t, k, h)
    wo = f64(attn.wo_NHD)
    y = np.zeros((b, t, d))
    for i in range(b):
        q_i, k_i = rope_ref(q[i], cfg.rope_theta), rope_ref(key[i], cfg.rope_theta)
        for head in range(n):
            j = head // (n // k)
            scores = q_i[:, head] @ k_i[:, j].T / np.sqrt(h)
            scores[np.triu_indices(t, 1)] = -np.inf
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            y[i] += (p @ value[i, :, j]) @ wo[head]
    return y


def _randomize(var: nnx.Variable, seed: int) -> None:
    # Biases start at zero and norm scales at one; random values make the test see them.
    var[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(seed), var[...].shape)


ATTENTION_CASES = {
    "plain": {},
    "gqa_bias_qknorm": {"num_kv_heads": 2, "head_dim": 6, "qkv_bias": True, "qk_norm": True},
    # Multi-query, three heads that do not divide d_model=32, a large RoPE theta (Mixtral's).
    "mqa_head_dim": {"num_heads": 3, "num_kv_heads": 1, "head_dim": 4, "qk_norm": True,
                     "rope_theta": 1e6},
}  # fmt: skip


@pytest.mark.parametrize("features", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention_matches_per_head_reference(features):
    cfg = model_config(**features)
    attn = Attention(cfg, nnx.Rngs(7))
    for seed, name in enumerate(("bq_NH", "bk_JH", "bv_JH")):
        if cfg.qkv_bias:
            _randomize(getattr(attn, name), seed)
    if cfg.qk_norm:
        _randomize(attn.q_norm.scale_D, 3)
        _randomize(attn.k_norm.scale_D, 4)
    x = jax.random.normal(jax.random.key(8), (2, T, D))
    y = attn(x)
    assert y.shape == (2, T, D) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _attention_ref(attn, cfg, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, head_width, backend, want",
    [("bfloat16", 64, "gpu", "cudnn"), ("float16", 128, "gpu", "cudnn"),
     ("float32", 64, "gpu", "xla"), ("bfloat16", 12, "gpu", "xla_low_precision"),
     ("bfloat16", 256, "gpu", "xla_low_precision"), ("bfloat16", 64, "cpu", "xla_low_precision"),
     ("float32", 64, "tpu", "xla")],
)  # fmt: skip
def test_attention_implementation_follows_platform_dtype_and_shape(dtype, head_width, backend,
                                                                   want):  # fmt: skip
    assert attention.implementation(jnp.dtype(dtype), head_width, backend) == want


def _bf16_attention_layer():
    cfg = model_config(**IMPORTED, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(Attention(cfg, nnx.Rngs(7)), nnx.Param)
    x_BTD = jax.random.normal(jax.random.key(8), (2, T, D)).astype(jnp.bfloat16)
    return cfg, graphdef, params, x_BTD


def _float32_residuals_of_scores_size(fn, *args, b, n, t) -> list:
    """Float32 arrays the backward pass of ``fn`` keeps with as many elements as [B, N, T, U]
    (in any arrangement of those axes, e.g. [B, J, N/J, T, U])."""
    _, vjp_fn = jax.vjp(fn, *args)
    return [r.shape for r in jax.tree.leaves(vjp_fn)
            if r.dtype == jnp.float32 and r.size >= b * n * t * t]  # fmt: skip


def test_bf16_attention_keeps_no_float32_scores_for_the_backward_pass():
    cfg, graphdef, params, x_BTD = _bf16_attention_layer()

    def layer(p, x):
        return nnx.merge(graphdef, p)(x)

    assert layer(params, x_BTD).dtype == jnp.bfloat16
    assert _float32_residuals_of_scores_size(layer, params, x_BTD, b=2, n=4, t=T) == []
    # The check has teeth: XLA's own path keeps float32 [B, J, G, T, U] tensors.
    q = jnp.ones((2, T, 4, 8), jnp.bfloat16)
    kv = jnp.ones((2, T, 2, 8), jnp.bfloat16)
    xla = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
    assert _float32_residuals_of_scores_size(xla, q, kv, kv, b=2, n=4, t=T)


def test_bf16_attention_and_gradients_track_float32():
    cfg, graphdef, params, x_BTD = _bf16_attention_layer()
    cfg32 = dataclasses.replace(cfg, dtype=jnp.float32)
    graphdef32 = nnx.graphdef(Attention(cfg32, nnx.Rngs(7)))
    x32 = x_BTD.astype(jnp.float32)
    probe = jax.random.normal(jax.random.key(9), (2, T, D))

    def loss(g, p, x):
        return jnp.sum(nnx.merge(g, p)(x).astype(jnp.float32) * probe)

    want = jax.grad(loss, argnums=(1, 2))(graphdef32, params, x32)
    got = jax.grad(loss, argnums=(1, 2))(graphdef, params, x_BTD)
    np.testing.assert_allclose(
        np.asarray(nnx.merge(graphdef, params)(x_BTD), np.float32),
        nnx.merge(graphdef32, params)(x32), atol=0.05, rtol=0.05,
    )  # fmt: skip
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(b)


def _cached_attention_ref(q_BTNH, k_BUJH, v_BUJH, start_B) -> np.ndarray:
    """Per-row, per-head float64 loop: query t of row b sees keys 0 .. start_b + t."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BTNH, k_BUJH, v_BUJH))
    b, t, n, h = q.shape
    per_kv = n // k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        for pos in range(t):
            seen = start_B[i] + pos + 1
            for head in range(n):
                j = head // per_kv
                scores = k[i, :seen, j] @ q[i, pos, head] / np.sqrt(h)
                p = np.exp(scores - scores.max())
                out[i, pos, head] = (p / p.sum()) @ v[i, :seen, j]
    return out


def test_cached_attention_sees_each_row_s_written_positions_only():
    k_q, k_k, k_v = jax.random.split(jax.random.key(2), 3)
    q_BTNH = jax.random.normal(k_q, (2, 3, 4, 8))
    k_BUJH = jax.random.normal(k_k, (2, 10, 2, 8))
    v_BUJH = jax.random.normal(k_v, (2, 10, 2, 8))
    start_B = [4, 1]  # the rows' next positions differ; keys past them are never read
    got = attention.cached_attention(q_BTNH, k_BUJH, v_BUJH, jnp.asarray(start_B))
    want = _cached_attention_ref(q_BTNH, k_BUJH, v_BUJH, start_B)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Garbage in the unwritten tail changes nothing.
    noisy = k_BUJH.at[:, 7:].set(1e3)
    again = attention.cached_attention(q_BTNH, noisy, v_BUJH, jnp.asarray(start_B))
    np.testing.assert_array_equal(again, got)
