"""grouped_matmul against a per-expert float64 loop, values and gradients, on every backend."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dynmoe_jax.moe.kernels import grouped_matmul as gm

SIZES = [8, 0, 4, 12]  # multiples of the block size 4; expert 1 has no rows
ROWS = 32  # 8 rows past the last group


def _inputs(rows=ROWS, x_dim=5, y_dim=6, sizes=SIZES):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (rows, x_dim))
    w = jax.random.normal(kw, (len(sizes), x_dim, y_dim))
    cotangent = jax.random.normal(kc, (rows, y_dim))
    return x, w, jnp.asarray(sizes, jnp.int32), cotangent


def _loop_reference(x, w, sizes, cotangent):
    """(y, dx, dw) of sum(y * cotangent) by a per-expert float64 loop."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, cotangent))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows] = x[rows] @ w[e]
        dx[rows] = ct[rows] @ w[e].T
        dw[e] = x[rows].T @ ct[rows]
        start += n
    return y, dx, dw


@pytest.mark.parametrize("backend", ["blocks", "ragged_dot"])
def test_backend_matches_loop_reference_with_gradients(backend):
    x, w, sizes, ct = _inputs()

    def loss(x, w):
        y = gm.grouped_matmul(x, w, sizes, block_size=4, backend=backend)
        return jnp.sum(y * ct), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    y_ref, dx_ref, dw_ref = _loop_reference(x, w, SIZES, ct)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(y)[sum(SIZES) :])  # rows past the groups are zeros


def test_megablox_matches_reference_in_pallas_tpu_interpret_mode():
    # Off a TPU, Pallas's own TPU interpret mode runs the megablox kernel (on a TPU, natively).
    x, w, sizes, ct = _inputs(rows=256, x_dim=128, y_dim=128, sizes=[128, 0, 0, 128])
    with pltpu.force_tpu_interpret_mode():
        y = gm.grouped_matmul(x, w, sizes, block_size=128, backend="megablox")
    y_ref, _, _ = _loop_reference(x, w, [128, 0, 0, 128], ct)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-3)


def test_expert_blocks_are_the_blocks_in_use():
    first, count = gm.expert_blocks(jnp.asarray(SIZES), ROWS // 4, 4)
    np.testing.assert_array_equal(first, [0, 2, 2, 3])
    np.testing.assert_array_equal(count, [2, 0, 1, 3])  # the loops visit 6 of the 8 blocks
    first, count = gm.expert_blocks(jnp.asarray([8, 8]), 3, 4)  # clipped to the buffer
    np.testing.assert_array_equal(first, [0, 2])
    np.testing.assert_array_equal(count, [2, 1])


def _while_bodies(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            yield eqn.params["body_jaxpr"].jaxpr
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _while_bodies(sub)


def test_backward_loop_never_builds_a_full_weight_gradient_per_block():
    x, w, sizes, ct = _inputs()

    def loss(x, w):
        return jnp.sum(gm.grouped_matmul(x, w, sizes, block_size=4, backend="blocks") * ct)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w).jaxpr
    bodies = list(_while_bodies(jaxpr))
    # The block loops (dynamic trip counts: while), forward and backward, inside the expert
    # loops (static trip counts: scans).
    assert len(bodies) == 2
    for body in bodies:
        full = [e.primitive.name for e in body.eqns
                if any(getattr(v.aval, "shape", None) == w.shape for v in e.outvars)]  # fmt: skip
        assert full == []  # no per-block work yields an [E, X, Y] value


def test_rows_not_a_multiple_of_the_block_are_refused():
    x, w, sizes, _ = _inputs(rows=30)
    with pytest.raises(ValueError, match="30 rows are not a multiple of 4"):
        gm.grouped_matmul(x, w, sizes, block_size=4, backend="blocks")


def test_default_backend_by_platform():
    assert gm.default_backend("cpu") is gm.Backend.BLOCKS
    assert gm.default_backend("tpu") is gm.Backend.RAGGED_DOT
