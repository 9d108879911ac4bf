"""Causal softmax attention with grouped-query heads, its implementation chosen per call.

Axis letters (the package's glossary): B batch, T query positions, U key positions, N query
heads, J key/value heads, I query heads per key/value head (N = J * I), H head width.

* float32: ``jax.nn.dot_product_attention`` with XLA, scores and softmax in float32.
* bfloat16 / float16 on GPU, head width a multiple of 8 up to 128: the cuDNN fused kernel,
  a flash attention that keeps per-row softmax statistics instead of the scores.
* bfloat16 / float16 elsewhere: scores accumulated and softmaxed in float32, but only the
  probabilities, in the activations' dtype, are kept for the backward pass, whose matmuls
  take the softmax's gradient rounded to that dtype (as fused kernels do). XLA's path of
  ``dot_product_attention`` keeps two float32 [B, N, T, U] tensors per layer, a bf16 one and
  a boolean mask for the backward pass; this path keeps one bf16 [B, N, T, U] tensor.

The choice is made at trace time from the inputs' dtype and shapes and
``jax.default_backend()``: a pure function of its inputs, no global switch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def implementation(dtype, head_width: int, backend: str | None = None) -> str:
    """'cudnn' | 'xla' | 'xla_low_precision': how attention on such inputs runs."""
    backend = jax.default_backend() if backend is None else backend
    if jnp.dtype(dtype) not in map(jnp.dtype, LOW_PRECISION):
        return "xla"
    if backend == "gpu" and head_width % 8 == 0 and head_width <= 128:
        return "cudnn"
    return "xla_low_precision"


def causal_attention(q_BTNH: jax.Array, k_BUJH: jax.Array, v_BUJH: jax.Array) -> jax.Array:
    """Causal attention, 1/sqrt(H) scaled. Query head n reads key/value head n // I, the layout
    of Hugging Face's ``repeat_kv`` and of ``jax.nn.dot_product_attention``."""
    impl = implementation(q_BTNH.dtype, q_BTNH.shape[-1])
    if impl == "xla_low_precision":
        return _low_precision_attention(q_BTNH, k_BUJH, v_BUJH)
    return jax.nn.dot_product_attention(q_BTNH, k_BUJH, v_BUJH, is_causal=True, implementation=impl)


def _low_precision_attention(q_BTNH, k_BUJH, v_BUJH) -> jax.Array:
    # Each key/value head repeated for the N / J query heads it serves (the backward pass
    # sums them back); [B, U, N, H] is T / H times smaller than the scores.
    per_kv = q_BTNH.shape[2] // k_BUJH.shape[2]
    k_BUNH, v_BUNH = (jnp.repeat(a, per_kv, axis=2) for a in (k_BUJH, v_BUJH))
    probs_BNTU = _causal_probs(q_BTNH, k_BUNH)
    return jnp.einsum("BNTU,BUNH->BTNH", probs_BNTU, v_BUNH)


def _scores(q_BTNH, k_BUNH) -> jax.Array:
    """Scaled causal scores [B, N, T, U] in float32; an additive [T, U] mask (a select
    would need its broadcast predicate of the full shape again in the backward pass)."""
    t, u, h = q_BTNH.shape[1], k_BUNH.shape[1], q_BTNH.shape[-1]
    scores_BNTU = jnp.einsum("BTNH,BUNH->BNTU", q_BTNH, k_BUNH, preferred_element_type=jnp.float32)
    causal_TU = jnp.tril(jnp.ones((t, u), jnp.bool_))
    mask_TU = jnp.where(causal_TU, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return scores_BNTU * (h**-0.5) + mask_TU[None, None]


@jax.custom_vjp
def _causal_probs(q_BTNH: jax.Array, k_BUNH: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H)) over the causal keys, in float32, returned in q's dtype."""
    return jax.nn.softmax(_scores(q_BTNH, k_BUNH), axis=-1).astype(q_BTNH.dtype)


def _probs_fwd(q_BTNH, k_BUNH):
    probs_BNTU = _causal_probs(q_BTNH, k_BUNH)
    return probs_BNTU, (q_BTNH, k_BUNH, probs_BNTU)  # the probabilities in the low precision


def _probs_bwd(res, g_BNTU):
    # As fused kernels do: the softmax's gradient in float32, rounded to the inputs' dtype
    # for the two matmuls, which accumulate in float32.
    q_BTNH, k_BUNH, probs_BNTU = res
    p32, g32 = probs_BNTU.astype(jnp.float32), g_BNTU.astype(jnp.float32)
    scale = q_BTNH.shape[-1] ** -0.5
    ds_BNTU = (p32 * (g32 - jnp.sum(g32 * p32, axis=-1, keepdims=True)) * scale).astype(
        q_BTNH.dtype
    )
    f32 = jnp.float32
    dq_BTNH = jnp.einsum("BNTU,BUNH->BTNH", ds_BNTU, k_BUNH, preferred_element_type=f32)
    dk_BUNH = jnp.einsum("BNTU,BTNH->BUNH", ds_BNTU, q_BTNH, preferred_element_type=f32)
    return dq_BTNH.astype(q_BTNH.dtype), dk_BUNH.astype(k_BUNH.dtype)


_causal_probs.defvjp(_probs_fwd, _probs_bwd)


def cached_attention(
    q_BTNH: jax.Array, k_BUJH: jax.Array, v_BUJH: jax.Array, start: jax.Array
) -> jax.Array:
    """Attention of T queries at positions start .. start + T - 1 over a key/value cache of U
    positions (decoding; ``start`` a scalar or one per row [B]): query t sees the keys at
    positions <= start + t, so the cache's unwritten tail never counts. Scores and softmax in
    float32; query head n reads key/value head n // I, as ``causal_attention``."""
    b, t, n, h = q_BTNH.shape
    u, j = k_BUJH.shape[1], k_BUJH.shape[2]
    q_BTJIH = q_BTNH.reshape(b, t, j, n // j, h)
    scores_BJITU = jnp.einsum(
        "BTJIH,BUJH->BJITU", q_BTJIH, k_BUJH, preferred_element_type=jnp.float32
    )
    start_B = jnp.broadcast_to(jnp.asarray(start), (b,))
    last_BT = start_B[:, None] + jnp.arange(t)[None, :]
    visible_B11TU = (jnp.arange(u)[None, None, :] <= last_BT[..., None])[:, None, None]
    scores_BJITU = jnp.where(visible_B11TU, scores_BJITU * (h**-0.5), jnp.finfo(jnp.float32).min)
    probs_BJITU = jax.nn.softmax(scores_BJITU, axis=-1).astype(v_BUJH.dtype)
    out_BTJIH = jnp.einsum("BJITU,BUJH->BTJIH", probs_BJITU, v_BUJH)
    return out_BTJIH.reshape(b, t, n, h)
