"""Causal softmax attention with grouped-query heads, its implementation chosen per call.

Axis letters: B batch, T query positions, U key positions, N query heads, J key/value heads,
G = N / J query heads per key/value head, H head width.

* float32: ``jax.nn.dot_product_attention`` with XLA, scores and softmax in float32.
* bfloat16 / float16 on GPU, head width a multiple of 8 up to 128: the cuDNN fused kernel,
  which keeps no [B, N, T, U] tensor at all.
* bfloat16 / float16 elsewhere: scores accumulated and softmaxed in float32, but the softmax
  keeps only its output, in the activations' dtype, for the backward pass. XLA's path of
  ``dot_product_attention`` keeps two float32 [B, N, T, U] tensors (the exponentials and the
  probabilities) per layer, twice the bytes of the scores in bf16 each.

The choice is made at trace time from the inputs' dtype and shapes and
``jax.default_backend()``: a pure function of its inputs, no global switch.
"""

from __future__ import annotations

import functools

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
    scores_BJGTU = jnp.einsum(
        "BTJGH,BUJH->BJGTU", q_BTJGH, k_BUJH, preferred_element_type=jnp.float32
    ) * (h**-0.5)
    # An additive [T, U] mask: a select would keep its broadcast predicate (and XLA a float32
    # operand) of the full [B, J, G, T, U] shape for the backward pass.
    causal_TU = jnp.tril(jnp.ones((t, k_BUJH.shape[1]), jnp.bool_))
    mask_TU = jnp.where(causal_TU, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    scores_BJGTU = scores_BJGTU + mask_TU
    probs_BJGTU = _softmax_kept_as(scores_BJGTU, q_BTNH.dtype)
    out_BTJGH = jnp.einsum("BJGTU,BUJH->BTJGH", probs_BJGTU, v_BUJH)
    return out_BTJGH.reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_kept_as(scores: jax.Array, dtype) -> jax.Array:
    """Softmax over the last axis in float32, returned (and kept for the backward) in dtype."""
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_fwd(scores, dtype):
    probs = _softmax_kept_as(scores, dtype)
    return probs, probs


def _softmax_bwd(dtype, probs, g):
    # d softmax: p * (g - sum(g * p)), in float32 from the kept probabilities.
    p32, g32 = probs.astype(jnp.float32), g.astype(jnp.float32)
    return (p32 * (g32 - jnp.sum(g32 * p32, axis=-1, keepdims=True)),)


_softmax_kept_as.defvjp(_softmax_fwd, _softmax_bwd)
