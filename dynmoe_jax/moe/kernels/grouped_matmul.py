"""One grouped matmul, ``y[r] = x[r] @ w[expert of row r]``, with a backend per platform.

Rows come sorted by expert: ``group_sizes_E[e]`` consecutive rows belong to expert e, and rows
past ``sum(group_sizes_E)`` come out as zeros. The MoE layer calls ``grouped_swiglu``, which on
CPU fuses the experts' three matmuls into one loop of big chunks and otherwise composes three
calls of this function. Backends (``Backend``; ``None`` picks by platform):

* ``blocks`` (CPU default): a pure-JAX loop over blocks of ``block_size`` rows. The caller pads
  every expert's rows to a multiple of the block, so each block belongs to one expert and
  computes ``[block, X] x w[e]``. An outer loop over the experts slices w[e] once (slicing it
  per block cost a weight-sized copy per block); an inner loop with a dynamic trip count visits
  that expert's blocks in use only, so the cost follows the selections actually made and a
  block past the last one in use is never visited (what a ``lax.cond`` per block would give,
  without the branch). A while loop cannot be reverse-differentiated, so a ``custom_vjp``
  supplies the backward, blocked too: dX uses ``w[e]^T``, and dW[e] accumulates in an [X, Y]
  carry written into the [E, X, Y] gradient once per expert; no per-block work touches the
  whole [E, X, Y] array. The loop is never vmapped (that would turn the trip count into the
  largest one and every block's work into a select), so callers flatten all routing groups into
  one buffer. XLA's CPU ``ragged_dot`` instead expands to every expert on every row.
* ``ragged_dot`` (GPU with compute capability >= 8, and TPU): ``jax.lax.ragged_dot``, lowered
  by XLA's own ragged dot. JAX has a Pallas/Triton lowering of it for GPUs behind the
  process-wide flag ``jax_ragged_dot_use_gpu_pallas_triton_lowering``, read when a program is
  lowered, not traced; a library must not flip process-wide settings, so this module leaves it
  alone. An application that wants it sets it once, before it builds its GPU program, with
  ``jax.config.update`` (JAX 0.10.2, the tested pin, lacks the module that flag imports).
* ``megablox`` (TPU alternative): ``jax.experimental.pallas.ops.tpu.megablox.gmm`` (its own
  custom_vjp of gmm and tgmm). Off a TPU it runs under Pallas's TPU interpret mode
  (``jax.experimental.pallas.tpu.force_tpu_interpret_mode``), slowly.

Axis letters: R rows (sorted by expert), E experts, X input width, Y output width. Blocks of
``block_size`` rows carry no letter (N and B mean heads and batch elsewhere).
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp


class Backend(str, enum.Enum):
    BLOCKS = "blocks"
    RAGGED_DOT = "ragged_dot"
    MEGABLOX = "megablox"


def default_backend(platform: str | None = None) -> Backend:
    """``blocks`` on CPU and on GPUs of compute capability below 8; ``ragged_dot`` elsewhere."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        capability = getattr(jax.devices()[0], "compute_capability", "0")
        return Backend.RAGGED_DOT if float(capability) >= 8.0 else Backend.BLOCKS
    return Backend.RAGGED_DOT if platform == "tpu" else Backend.BLOCKS


def grouped_matmul(
    x_RX: jax.Array,
    w_EXY: jax.Array,
    group_sizes_E: jax.Array,
    *,
    block_size: int,
    backend: Backend | str | None = None,
) -> jax.Array:
    """``x_RX`` [R, X] rows sorted by expert, ``w_EXY`` [E, X, Y] -> [R, Y] in x's dtype.

    ``blocks`` needs R and every group size to be multiples of ``block_size``.
    """
    backend = default_backend() if backend is None else Backend(backend)
    return _BACKENDS[backend](x_RX, w_EXY, group_sizes_E, block_size)


def _ragged_dot(x_RX, w_EXY, group_sizes_E, block_size):
    del block_size
    return jax.lax.ragged_dot(x_RX, w_EXY, group_sizes_E.astype(jnp.int32))


def _megablox(x_RX, w_EXY, group_sizes_E, block_size):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    tiling = (block_size, min(128, x_RX.shape[1]), min(128, w_EXY.shape[2]))
    return megablox.gmm(x_RX, w_EXY, group_sizes_E.astype(jnp.int32), x_RX.dtype, tiling)


def _blocks(x_RX, w_EXY, group_sizes_E, block_size):
    num_rows = x_RX.shape[0]
    if num_rows % block_size:
        raise ValueError(f"grouped_matmul: {num_rows} rows are not a multiple of {block_size}")
    first_E, count_E = expert_blocks(group_sizes_E, num_rows // block_size, block_size)
    return _block_matmul(block_size, x_RX, w_EXY.astype(x_RX.dtype), first_E, count_E)


def expert_blocks(
    group_sizes_E: jax.Array, num_blocks: int, block_size: int
) -> tuple[jax.Array, jax.Array]:
    """(int32[E] each expert's first block, int32[E] its blocks), clipped to the buffer."""
    count_E = group_sizes_E.astype(jnp.int32) // block_size
    first_E = jnp.minimum(jnp.cumsum(count_E) - count_E, num_blocks)
    return first_E, jnp.minimum(count_E, num_blocks - first_E)


def _blocks_view(a_RX: jax.Array, num_rows_per_block: int) -> jax.Array:
    return a_RX.reshape(-1, num_rows_per_block, a_RX.shape[-1])


def _put(a_stack: jax.Array, a_XY: jax.Array, i: jax.Array) -> jax.Array:
    """a_stack with slice i replaced; in place inside a loop."""
    return jax.lax.dynamic_update_slice(a_stack, a_XY[None], (i, 0, 0))


def _per_expert(first_E, count_E, body, init):
    """``body(e, i, carry)`` for every block i of every expert e, experts in order. The
    expert loop slices w[e] once; the block loop runs only over blocks in use."""

    def expert(e, carry):
        return body(e, first_E[e], first_E[e] + count_E[e], carry)

    return jax.lax.fori_loop(0, first_E.shape[0], expert, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_matmul(block_size, x_RX, w_EXY, first_E, count_E):
    x_blocks = _blocks_view(x_RX, block_size)

    def body(e, start, stop, y_blocks):
        w_XY = w_EXY[e]  # once per expert, not once per block
        put = lambda i, y: _put(y, x_blocks[i] @ w_XY, i)  # noqa: E731
        return jax.lax.fori_loop(start, stop, put, y_blocks)

    y_blocks = jnp.zeros(x_blocks.shape[:2] + (w_EXY.shape[2],), x_RX.dtype)
    return _per_expert(first_E, count_E, body, y_blocks).reshape(x_RX.shape[0], -1)


def _block_matmul_fwd(block_size, x_RX, w_EXY, first_E, count_E):
    y_RY = _block_matmul(block_size, x_RX, w_EXY, first_E, count_E)
    return y_RY, (x_RX, w_EXY, first_E, count_E)


def _block_matmul_bwd(block_size, res, dy_RY):
    x_RX, w_EXY, first_E, count_E = res
    x_blocks = _blocks_view(x_RX, block_size)
    dy_blocks = _blocks_view(dy_RY.astype(x_RX.dtype), block_size)
    dot = jax.lax.dot_general
    contract_y = functools.partial(dot, dimension_numbers=(((1,), (1,)), ((), ())))
    contract_rows = functools.partial(dot, dimension_numbers=(((0,), (0,)), ((), ())))

    def body(e, start, stop, carry):
        dx_blocks, dw_EXY = carry
        w_XY = w_EXY[e]

        def block_step(i, c):
            dx_blocks, dw_XY = c
            dx_blocks = _put(dx_blocks, contract_y(dy_blocks[i], w_XY), i)  # dy @ w[e]^T
            return dx_blocks, dw_XY + contract_rows(x_blocks[i], dy_blocks[i]).astype(dw_XY.dtype)

        # dW[e] accumulates in an [X, Y] carry and is written into [E, X, Y] once per expert.
        dx_blocks, dw_XY = jax.lax.fori_loop(start, stop, block_step, (dx_blocks, zeros_XY))
        return dx_blocks, _put(dw_EXY, dw_XY, e)

    zeros_XY = jnp.zeros(w_EXY.shape[1:], w_EXY.dtype)
    init = (jnp.zeros_like(x_blocks), jnp.zeros_like(w_EXY))
    dx_blocks, dw_EXY = _per_expert(first_E, count_E, body, init)
    return dx_blocks.reshape(x_RX.shape), dw_EXY, None, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)

_BACKENDS = {
    Backend.BLOCKS: _blocks,
    Backend.RAGGED_DOT: _ragged_dot,
    Backend.MEGABLOX: _megablox,
}
