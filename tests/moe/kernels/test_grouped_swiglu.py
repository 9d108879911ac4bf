"""grouped_swiglu (the fused SwiGLU of every expert on its rows) against a per-expert float64
loop, values and gradients, and its chunk walk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.moe.kernels import grouped_swiglu as gs

SWIGLU_SIZES = [8, 0, 4, 36, 12]  # multiples of the block size 4; expert 1 has no rows


def _swiglu_inputs(rows, sizes, d=5, f=7):
    ks = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(ks[0], (rows, d))
    gate = jax.random.normal(ks[1], (len(sizes), d, f))
    up = jax.random.normal(ks[2], (len(sizes), d, f))
    down = jax.random.normal(ks[3], (len(sizes), f, d)) / 2
    return x, (gate, up, down), jax.random.normal(ks[4], (rows, d))


def _swiglu_reference(x, weights, sizes, cotangent):
    """(y, dx, (dgate, dup, ddown)) of sum(y * cotangent), per-expert float64 loop."""
    x, ct = np.asarray(x, np.float64), np.asarray(cotangent, np.float64)
    gate, up, down = (np.asarray(w, np.float64) for w in weights)
    y, dx = np.zeros_like(x), np.zeros_like(x)
    dws = [np.zeros_like(gate), np.zeros_like(up), np.zeros_like(down)]
    start = 0
    for e, n in enumerate(sizes):
        r = slice(start, start + n)
        g, u = x[r] @ gate[e], x[r] @ up[e]
        sig = 1 / (1 + np.exp(-g))
        h = g * sig * u
        y[r] = h @ down[e]
        dh = ct[r] @ down[e].T
        dg, du = dh * u * (sig + g * sig * (1 - sig)), dh * g * sig
        dx[r] = dg @ gate[e].T + du @ up[e].T
        dws[0][e], dws[1][e], dws[2][e] = x[r].T @ dg, x[r].T @ du, h.T @ ct[r]
        start += n
    return y, dx, dws


@pytest.mark.parametrize(
    ("backend", "max_chunk_rows", "rows", "sizes"),
    [
        ("blocks", 4, 64, SWIGLU_SIZES),  # one block per chunk
        ("blocks", 16, 64, SWIGLU_SIZES),  # chunks of 16, then one of 8 and/or 4
        ("blocks", 1024, 64, SWIGLU_SIZES),  # capped at the 64 rows: 36 rows = 32 + 4
        ("blocks", 16, 60, [8, 0, 4, 36, 12]),  # every row in use: the full-budget case
        ("ragged_dot", 16, 64, SWIGLU_SIZES),
        ("tokamax", 16, 64, SWIGLU_SIZES),
    ],
)
def test_grouped_swiglu_matches_loop_reference_with_gradients(backend, max_chunk_rows, rows, sizes):
    if backend == "tokamax":
        pytest.importorskip("tokamax")
    x, weights, ct = _swiglu_inputs(rows, sizes)
    y, dx, dws = _value_and_grads(x, weights, sizes, ct, backend, max_chunk_rows)
    y_ref, dx_ref, dws_ref = _swiglu_reference(x, weights, sizes, ct)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(dws, dws_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(y)[sum(sizes) :])  # rows past the groups are zeros
    assert not np.any(np.asarray(dws[0])[1])  # the empty expert gets a zero gradient


def _value_and_grads(x, weights, sizes, ct, backend, max_chunk_rows=16):
    def loss(x, weights):
        y = gs.grouped_swiglu(x, jnp.asarray(sizes, jnp.int32), *weights, block_size=4,
                              backend=backend, max_chunk_rows=max_chunk_rows)  # fmt: skip
        return jnp.sum((y * ct).astype(jnp.float32)), y

    (_, y), (dx, dws) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, weights)
    return y, dx, dws


SAME_AS_CPU_SIZES = {
    "empty_expert": SWIGLU_SIZES,  # 4 rows past the groups
    "one_expert_every_row": [0, 0, 64, 0, 0],
    "one_expert_rows_past": [0, 0, 0, 40, 0],
    "no_rows": [0, 0, 0, 0, 0],
}
# Relative to each array's largest entry: both paths accumulate in float32, but in bfloat16
# they round the three products' outputs (and h) at different points, and a gradient summed
# over many rows cancels, so its small entries keep only the error of its large ones.
SAME_AS_CPU_TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(SAME_AS_CPU_SIZES))
def test_tokamax_gives_the_cpu_paths_outputs_and_gradients(case, dtype):
    # On CPU the tokamax backend runs tokamax's "xla" implementation; the CPU path is the
    # fused chunk loop ("blocks"), the platform's default.
    pytest.importorskip("tokamax")
    sizes = SAME_AS_CPU_SIZES[case]
    x, weights, ct = _swiglu_inputs(64, sizes)
    x, ct, weights = x.astype(dtype), ct.astype(dtype), tuple(w.astype(dtype) for w in weights)
    got = _value_and_grads(x, weights, sizes, ct, "tokamax")
    want = _value_and_grads(x, weights, sizes, ct, "blocks")
    tol = SAME_AS_CPU_TOLERANCE[dtype]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype == dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.max(np.abs(b))))
    y, dx, _ = got
    assert not np.any(np.asarray(y, np.float32)[sum(sizes) :])  # padding rows come out zeros
    assert not np.any(np.asarray(dx, np.float32)[sum(sizes) :])


def test_chunks_cover_each_expert_once_biggest_first():
    assert gs.chunk_sizes(4, 16) == (16, 8, 4)
    assert gs.chunk_sizes(4, 20) == (16, 8, 4)

    def walk(start, count):
        def body(rows, row, c):
            visits, n = c
            return visits.at[row + jnp.arange(rows)].add(1), n.at[rows].add(1)

        init = (jnp.zeros(64, jnp.int32), jnp.zeros(17, jnp.int32))
        return jax.jit(lambda s, c: gs.for_chunks((16, 8, 4), 4, s, c, body, init))(start, count)

    visits, chunks = walk(8, 11)  # 44 rows from row 8: 16 + 16 + 8 + 4
    np.testing.assert_array_equal(visits, [0] * 8 + [1] * 44 + [0] * 12)
    assert (chunks[16], chunks[8], chunks[4]) == (2, 1, 1)
    visits, chunks = walk(4, 0)
    assert not np.any(visits) and not np.any(chunks)


def test_grouped_swiglu_rows_not_a_multiple_of_the_block_are_refused():
    x, weights, _ = _swiglu_inputs(30, SWIGLU_SIZES)
    with pytest.raises(ValueError, match="30 rows are not a multiple of 4"):
        gs.grouped_swiglu(x, jnp.asarray(SWIGLU_SIZES), *weights, block_size=4, backend="blocks")
