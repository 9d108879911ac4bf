"""Tokens to expert rows and back: the gather and the weighted scatter-add that the index and
grouped dispatches share. A row table (any shape A) names the token each row holds; rows that
hold nothing read zeros and add nothing.

Axis letters (the package's glossary): M tokens, D model width, A the row table's axes ([E, C]
or [R]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather(x_MD: jax.Array, token_A: jax.Array, valid_A: jax.Array) -> jax.Array:
    """x_AD: each row's token, zeros where a row holds none (SwiGLU has no bias, so an
    expert computes zeros there)."""
    return jnp.where(valid_A[..., None], x_MD[token_A], 0).astype(x_MD.dtype)


def scatter_add(
    y_AD: jax.Array, token_A: jax.Array, weight_A: jax.Array, valid_A: jax.Array, num_tokens: int
) -> jax.Array:
    """y_MD: each row's output times its weight, added to its token."""
    # `where`, not a product alone: a kernel may leave rows it did not use uninitialised.
    w_A1 = weight_A[..., None].astype(y_AD.dtype)
    y_AD = jnp.where(valid_A[..., None], w_A1 * y_AD, 0)
    return jnp.zeros((num_tokens, y_AD.shape[-1]), y_AD.dtype).at[token_A].add(y_AD)
