"""Tokens to expert rows and back: the gather and the weighted scatter-add that the index and
grouped dispatches share. A row table (any shape X) names the token each row holds; rows that
hold nothing read zeros and add nothing.

Axis letters: M tokens, D model width, X the row table's axes ([E, C] or [R]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather(x_MD: jax.Array, token_X: jax.Array, valid_X: jax.Array) -> jax.Array:
    """x_XD: each row's token, zeros where a row holds none (SwiGLU has no bias, so an
    expert computes zeros there)."""
    return jnp.where(valid_X[..., None], x_MD[token_X], 0).astype(x_MD.dtype)


def scatter_add(
    y_XD: jax.Array, token_X: jax.Array, weight_X: jax.Array, valid_X: jax.Array, num_tokens: int
) -> jax.Array:
    """y_MD: each row's output times its weight, added to its token."""
    # `where`, not a product alone: a kernel may leave rows it did not use uninitialised.
    w_X1 = weight_X[..., None].astype(y_XD.dtype)
    y_XD = jnp.where(valid_X[..., None], w_X1 * y_XD, 0)
    return jnp.zeros((num_tokens, y_XD.shape[-1]), y_XD.dtype).at[token_X].add(y_XD)
