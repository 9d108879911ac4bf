"""Every expert's SwiGLU on its own rows: ``y[r] = (silu(x[r] @ Wg[e]) * (x[r] @ Wu[e])) @ Wd[e]``.

Rows come sorted by expert as in ``grouped_matmul`` (``group_sizes_E[e]`` consecutive rows of
expert e, rows past their sum come out as zeros). The ``tokamax`` and ``ragged_dot`` backends
(GPU and TPU) compose three grouped matmuls. The ``blocks`` backend (CPU) fuses them into one
loop instead, because on CPU XLA's ragged dot runs every expert on every row:

* **One pass per chunk of rows.** For each expert (a scan, which slices its three weights once)
  a chunk of rows goes through gate, up, silu * up and down before the next chunk starts: one
  loop instead of three, and h = silu(gate) * up never exists as an [R, F] array.
* **Chunks as big as the expert's rows allow.** Rows stay padded to the block size b (so the
  padding stays small), but an expert's n blocks are walked as big chunks first: as many chunks
  of ``max_chunk_rows`` as fit, then at most one each of the halved sizes down to b (the binary
  digits of the remainder), so an expert costs at most ``n // max_blocks + log2(max_blocks) + 1``
  loop steps (``max_blocks = max_chunk_rows / b``) instead of n. Every step pays fixed costs
  besides its matmuls (the three [D, F] weight-gradient accumulators read and written, the loop
  itself), and a matmul of a few dozen rows runs below the rate of a big one.
* **Backward.** A ``custom_vjp`` (a while loop cannot be reverse-differentiated). The forward
  saves gate and up pre-activations ([R, F] each); the backward recomputes silu and h from them
  (elementwise) and walks the same chunks: dX, and dW[e] of all three weights accumulated in
  float32 [D, F] carries. The three dW are the scan's per-expert outputs: each [E, D, F]
  gradient is written slice by slice, once per expert, and no step of a chunk touches it.

Axis letters (the package's glossary): R rows (sorted by expert), E experts, D model width, F
expert hidden width, Z the rows of one chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import experts
from dynmoe_jax.moe.config import Backend
from dynmoe_jax.moe.kernels.grouped_matmul import default_backend, grouped_matmul

MAX_CHUNK_ROWS = 1024


def grouped_swiglu(
    x_RD: jax.Array,
    group_sizes_E: jax.Array,
    w_gate_EDF: jax.Array,
    w_up_EDF: jax.Array,
    w_down_EFD: jax.Array,
    *,
    block_size: int,
    backend: Backend | str | None = None,
    max_chunk_rows: int = MAX_CHUNK_ROWS,
) -> jax.Array:
    """``x_RD`` [R, D] rows sorted by expert -> [R, D] in x's dtype (weights cast to it).

    ``blocks`` needs R and every group size to be multiples of ``block_size``; its chunks are
    ``block_size`` times powers of two up to ``max_chunk_rows``.
    """
    backend = default_backend() if backend is None else Backend(backend)
    weights = experts.cast((w_gate_EDF, w_up_EDF, w_down_EFD), x_RD.dtype)
    if backend is not Backend.BLOCKS:
        weights = experts.stacked_weights(weights)
        gmm = functools.partial(grouped_matmul, group_sizes_E=group_sizes_E, backend=backend)
        h_RF = jax.nn.silu(gmm(x_RD, weights[0])) * gmm(x_RD, weights[1])
        return gmm(h_RF, weights[2])
    num_rows = x_RD.shape[0]
    if num_rows % block_size:
        raise ValueError(f"grouped_swiglu: {num_rows} rows are not a multiple of {block_size}")
    first_E, count_E = expert_blocks(group_sizes_E, num_rows // block_size, block_size)
    sizes = chunk_sizes(block_size, min(max_chunk_rows, num_rows))
    if experts.is_split(weights[0]):  # the decode layout: forward only
        return _forward(sizes, x_RD, weights, first_E * block_size, count_E, False)[0]
    return _fused(sizes, x_RD, *weights, first_E * block_size, count_E)


def expert_blocks(
    group_sizes_E: jax.Array, num_blocks: int, block_size: int
) -> tuple[jax.Array, jax.Array]:
    """(int32[E] each expert's first block, int32[E] its blocks), clipped to the buffer."""
    count_E = group_sizes_E.astype(jnp.int32) // block_size
    first_E = jnp.minimum(jnp.cumsum(count_E) - count_E, num_blocks)
    return first_E, jnp.minimum(count_E, num_blocks - first_E)


def chunk_sizes(block_size: int, max_chunk_rows: int) -> tuple[int, ...]:
    """Chunk sizes in rows, largest first: ``block_size * 2**j`` up to ``max_chunk_rows``."""
    sizes = [block_size]
    while sizes[-1] * 2 <= max_chunk_rows:
        sizes.append(sizes[-1] * 2)
    return tuple(reversed(sizes))


def for_chunks(sizes, block_size, start, count, body, carry):
    """``body(rows, row, carry)`` over chunks covering ``count`` blocks from row ``start``:
    as many chunks of ``sizes[0]`` rows as fit, then one of each smaller size the remainder
    holds (each size divides the one before, so the remainder needs at most one of each).

    A size with no chunk is skipped by a ``cond``, not entered as a loop of no step: XLA on CPU
    copies the weights a loop reads into its state on entry, whether or not a step runs, and at
    decode sizes most sizes have no chunk. (One loop whose step switches between the sizes
    avoids those copies too, but trained slower: each switch copied the carry.)
    """
    left = count * block_size
    for rows in sizes:
        n = left // rows

        def loop(c, n=n, rows=rows, at=start):
            return jax.lax.fori_loop(0, n, lambda i, c: body(rows, at + i * rows, c), c)

        carry = jax.lax.cond(n > 0, loop, lambda c: c, carry)
        start, left = start + n * rows, left - n * rows
    return carry


def _rows(a_RX: jax.Array, row: jax.Array, rows: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a_RX, row, rows)


def _put(a_RX: jax.Array, a_ZX: jax.Array, row: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a_RX, a_ZX, row, 0)


def _contract_rows(a_ZX: jax.Array, b_ZY: jax.Array) -> jax.Array:
    """a^T @ b in float32: one chunk's share of a weight gradient."""
    dims = (((0,), (0,)), ((), ()))
    return jax.lax.dot_general(a_ZX, b_ZY, dims, preferred_element_type=jnp.float32)


def _forward(sizes, x_RD, weights, start_E, count_E, save: bool):
    """y_RD, and (if ``save``) the gate and up pre-activations [R, F] for the backward.

    ``weights``: stacked, or per expert (``experts.is_split``). An expert with no rows is
    skipped whole, its weights not even sliced: on CPU the slice is a weight-sized copy, and at
    decode sizes most experts have no rows.
    """
    num_rows, f = x_RD.shape[0], experts.expert_shape(weights[0])[1]
    block_size, split = sizes[-1], experts.is_split(weights[0])

    def expert(e, carry, expert_weights):
        def run(c):
            weights_e = expert_weights()

            def chunk(rows, row, c):
                y_ZD, g_ZF, u_ZF = experts.swiglu_parts(_rows(x_RD, row, rows), *weights_e, split)
                saved = (_put(c[1], g_ZF, row), _put(c[2], u_ZF, row)) if save else ()
                return (_put(c[0], y_ZD, row), *saved)

            return for_chunks(sizes, block_size, start_E[e], count_E[e], chunk, c)

        return jax.lax.cond(count_E[e] > 0, run, lambda c: c, carry)

    init = [jnp.zeros_like(x_RD)] + [jnp.zeros((num_rows, f), x_RD.dtype)] * (2 * save)
    carry = tuple(init)
    if split:
        for e in range(experts.num_experts(weights[0])):
            carry = expert(e, carry, lambda e=e: tuple(w[e] for w in weights))
        return carry
    return jax.lax.fori_loop(
        0, start_E.shape[0], lambda e, c: expert(e, c, lambda: tuple(w[e] for w in weights)), carry
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(sizes, x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, start_E, count_E):
    weights = (w_gate_EDF, w_up_EDF, w_down_EFD)
    return _forward(sizes, x_RD, weights, start_E, count_E, False)[0]


def _fused_fwd(sizes, x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, start_E, count_E):
    ws = (w_gate_EDF, w_up_EDF, w_down_EFD)
    y_RD, g_RF, u_RF = _forward(sizes, x_RD, ws, start_E, count_E, True)
    return y_RD, (x_RD, *ws, g_RF, u_RF, start_E, count_E)


def _fused_bwd(sizes, res, dy_RD):
    x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, g_RF, u_RF, start_E, count_E = res
    dy_RD = dy_RD.astype(x_RD.dtype)
    block_size, dt = sizes[-1], x_RD.dtype
    contract_f = functools.partial(jax.lax.dot_general, dimension_numbers=(((1,), (1,)), ((), ())))

    def expert(dx_RD, w):
        wg_DF, wu_DF, wd_FD, start, count = w

        def chunk(rows, row, c):
            dx_RD, dwg_DF, dwu_DF, dwd_FD = c
            x_ZD, dy_ZD = _rows(x_RD, row, rows), _rows(dy_RD, row, rows)
            g_ZF, u_ZF = _rows(g_RF, row, rows), _rows(u_RF, row, rows)
            sig_ZF = jax.nn.sigmoid(g_ZF)
            silu_ZF = g_ZF * sig_ZF
            dh_ZF = contract_f(dy_ZD, wd_FD)  # dy @ Wd^T
            du_ZF = dh_ZF * silu_ZF
            dg_ZF = dh_ZF * u_ZF * (sig_ZF * (1 + g_ZF * (1 - sig_ZF)))  # silu'(g)
            dx_ZD = contract_f(dg_ZF, wg_DF) + contract_f(du_ZF, wu_DF)
            return (_put(dx_RD, dx_ZD.astype(dt), row),
                    dwg_DF + _contract_rows(x_ZD, dg_ZF), dwu_DF + _contract_rows(x_ZD, du_ZF),
                    dwd_FD + _contract_rows(silu_ZF * u_ZF, dy_ZD))  # fmt: skip

        zeros = (jnp.zeros(wg_DF.shape, jnp.float32),) * 2 + (jnp.zeros(wd_FD.shape, jnp.float32),)
        dx_RD, *dws = for_chunks(sizes, block_size, start, count, chunk, (dx_RD, *zeros))
        return dx_RD, tuple(d.astype(dt) for d in dws)

    weights = (w_gate_EDF, w_up_EDF, w_down_EFD, start_E, count_E)
    dx_RD, (dwg_EDF, dwu_EDF, dwd_EFD) = jax.lax.scan(expert, jnp.zeros_like(x_RD), weights)
    return dx_RD, dwg_EDF, dwu_EDF, dwd_EFD, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
