"""Gather and weighted scatter-add of expert rows against a per-row loop in float64."""

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax.moe import rows


def test_gather_and_scatter_add_match_a_loop_over_rows():
    M, D = 5, 3
    x_MD = jax.random.normal(jax.random.key(0), (M, D))
    token_A = jnp.asarray([[4, 0, 0], [2, 2, 1]], jnp.int32)  # [E, C] table, 2 experts
    valid_A = jnp.asarray([[True, True, False], [True, False, True]])
    weight_A = jnp.asarray([[0.5, 2.0, 9.0], [1.5, 9.0, 0.25]])
    y_AD = jax.random.normal(jax.random.key(1), (2, 3, D)).at[0, 2].set(jnp.nan)  # unused row

    x64, y64 = np.asarray(x_MD, np.float64), np.asarray(y_AD, np.float64)
    want_gather = np.zeros((2, 3, D))
    want_y = np.zeros((M, D))
    for e in range(2):
        for c in range(3):
            if valid_A[e, c]:
                want_gather[e, c] = x64[token_A[e, c]]
                want_y[token_A[e, c]] += float(weight_A[e, c]) * y64[e, c]
    np.testing.assert_allclose(rows.gather(x_MD, token_A, valid_A), want_gather)
    got = rows.scatter_add(y_AD, token_A, weight_A, valid_A, M)
    np.testing.assert_allclose(got, want_y, rtol=1e-6, atol=1e-6)  # the NaN row adds nothing
