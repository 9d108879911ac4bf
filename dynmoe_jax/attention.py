"""Causal softmax attention with grouped-query heads, its implementation chosen per call.

Axis letters: B batch, T query positions, U key positions, N query heads, J key/value heads,
G = N / J query heads per key/value head, H head width.

* float32: ``jax.nn.dot_product_attention`` with XLA, scores and softmax in float32.
* bfloat16 / float16 on GPU, head width a multiple of 8 up to 128: the cuDNN fused kernel,
  which keeps no [B, N, T, U] tensor at all.
* bfloat16 / float16 elsewhere: scores accumulated and softmaxed in float32, but only the
  probabilities, in the activations' dtype, are kept for the backward pass, whose matmuls
  take the softmax's gradient rounded to that dtype (as fused kernels do). XLA's path of
  ``dot_product_attention`` keeps two float32 [B, N, T, U] tensors (the exponentials and the
  probabilities) per layer, twice the bytes of the scores in bf16 each.

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
    """Causal attention, 1/sqrt(H) scaled. Query head n reads key/value head n // G, the layout
    of Hugging Face's ``repeat_kv`` and of ``jax.nn.dot_product_attention``."""
    impl = implementation(q_BTNH.dtype, q_BTNH.shape[-1])
    if impl == "xla_low_precision":
        return _low_precision_attention(q_BTNH, k_BUJH, v_BUJH)
    return jax.nn.dot_product_attention(q_BTNH, k_BUJH, v_BUJH, is_causal=True, implementation=impl)


def _low_precision_attention(q_BTNH, k_BUJH, v_BUJH) -> jax.Array:
    b, t, n, h = q_BTNH.shape
    j = k_BUJH.shape[2]
    q_BTJGH = q_BTNH.reshape(b, t, j, n // j, h)
    probs_BJGTU = _causal_probs(q_BTJGH, k_BUJH)
    out_BTJGH = jnp.einsum("BJGTU,BUJH->BTJGH", probs_BJGTU, v_BUJH)
    return out_BTJGH.reshape(b, t, n, h)


def _scores(q_BTJGH, k_BUJH) -> jax.Array:
    """Scaled causal scores [B, J, G, T, U] in float32; an additive [T, U] mask (a select
    would need its broadcast predicate of the full shape again in the backward pass)."""
    t, u, h = q_BTJGH.shape[1], k_BUJH.shape[1], q_BTJGH.shape[-1]
    scores = jnp.einsum("BTJGH,BUJH->BJGTU", q_BTJGH, k_BUJH, preferred_element_type=jnp.float32)
    causal_TU = jnp.tril(jnp.ones((t, u), jnp.bool_))
    mask_TU = jnp.where(causal_TU, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return scores * (h**-0.5) + mask_TU


@jax.custom_vjp
def _causal_probs(q_BTJGH: jax.Array, k_BUJH: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(H)) over the causal keys, in float32, returned in q's dtype."""
    return jax.nn.softmax(_scores(q_BTJGH, k_BUJH), axis=-1).astype(q_BTJGH.dtype)


def _probs_fwd(q_BTJGH, k_BUJH):
    probs = _causal_probs(q_BTJGH, k_BUJH)
    return probs, (q_BTJGH, k_BUJH, probs)  # the probabilities kept in the low precision


def _probs_bwd(res, g_BJGTU):
    # As fused kernels do: the softmax's gradient in float32, rounded to the inputs' dtype
    # for the two matmuls, which accumulate in float32.
    q_BTJGH, k_BUJH, probs = res
    p32, g32 = probs.astype(jnp.float32), g_BJGTU.astype(jnp.float32)
    ds = p32 * (g32 - jnp.sum(g32 * p32, axis=-1, keepdims=True)) * (q_BTJGH.shape[-1] ** -0.5)
    ds = ds.astype(q_BTJGH.dtype)
    f32 = jnp.float32
    dq = jnp.einsum("BJGTU,BUJH->BTJGH", ds, k_BUJH, preferred_element_type=f32)
    dk = jnp.einsum("BJGTU,BTJGH->BUJH", ds, q_BTJGH, preferred_element_type=f32)
    return dq.astype(q_BTJGH.dtype), dk.astype(k_BUJH.dtype)


_causal_probs.defvjp(_probs_fwd, _probs_bwd)
