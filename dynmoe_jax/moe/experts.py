"""The SwiGLU feed-forward, and the two layouts of E experts' weights.

``swiglu(x, w_gate, w_up, w_down) = (silu(x @ w_gate) * (x @ w_up)) @ w_down`` is the one
definition: the dense layers, the shared expert, every MoE path and the benchmarks' ideals
call it.

An MoE layer's three weights come in one of two layouts (``ExpertWeights``):

* **stacked**: one array per weight with a leading expert axis, [E, D, F], [E, D, F],
  [E, F, D]. Training, checkpoints, imports and sharding over the ``expert`` mesh axis use it.
* **per expert**: a tuple of E arrays per weight, in the compute dtype, each stored
  transposed, [out, in]: gate [F, D], up [F, D], down [D, F]. The decode layout
  (``split_weights``), made once outside ``jit``, for two measured reasons on XLA's CPU
  backend: a slice of a stacked parameter is copied before a matmul reads it, even a static
  one, so a decode step that reads only its tokens' experts would pay a copy of each, while
  separate arrays are read where they lie; and a product with few rows reads a weight faster
  when the contraction runs along its contiguous axis, the ``in`` axis of [out, in]
  (experiments/RESULTS.md, "Batched decoding"). The layer's paths take either layout, forward
  only for the per-expert one.

Axis letters (the package's glossary): E experts, A the rows' axes (whatever the caller's
layout), D model width, F hidden width, X and Y a product's input and output widths.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# (gate, up, down): stacked arrays [in, out], or tuples of E per-expert arrays [out, in].
ExpertWeights = tuple[Any, Any, Any]
NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")  # the MoE layer's parameters, in that order


def swiglu(x_AD: jax.Array, w_gate, w_up, w_down, split: bool = False) -> jax.Array:
    """SwiGLU of rows x [..., D] through one expert's (or a dense layer's) weights, stored
    [in, out] (gate and up [D, F], down [F, D]), or [out, in] when ``split`` (the per-expert
    layout)."""
    return swiglu_parts(x_AD, w_gate, w_up, w_down, split)[0]


def swiglu_parts(x_AD: jax.Array, w_gate, w_up, w_down, split: bool = False):
    """(y_AD, gate pre-activation g_AF, up u_AF): ``swiglu`` with what its backward reuses."""
    g_AF, u_AF = times(x_AD, w_gate, split), times(x_AD, w_up, split)
    return times(jax.nn.silu(g_AF) * u_AF, w_down, split), g_AF, u_AF


# Up to this many rows, a float32 product with a weight stored [out, in] is written as a
# multiply-reduce over the contiguous axis, which XLA's CPU backend hands to YNNPACK as one
# streaming loop; its matmul at these rows packs the weight first and measured slower
# (experiments/RESULTS.md, "Batched decoding").
REDUCE_ROWS = 32


def times(x_AX: jax.Array, w: jax.Array, split: bool) -> jax.Array:
    """x @ W for one expert's weight: stored [in, out] when stacked, [out, in] per expert."""
    return times_out_in(x_AX, w) if split else x_AX @ w


def times_out_in(x_AX: jax.Array, w_YX: jax.Array) -> jax.Array:
    """x @ w.T for rows x [..., X] and a weight stored [Y, X], in x's dtype.

    On XLA's CPU backend the form is chosen by rows and dtype, each the fastest measured at
    decode sizes: one row, a matrix-vector product (float32), or a float32 multiply-reduce
    (bfloat16, whose matrix-vector product XLA runs at a fraction of the bandwidth); 2 to
    ``REDUCE_ROWS`` float32 rows, the multiply-reduce; otherwise the matmul. Other backends
    always take the matmul. Both sum in float32 whatever the dtype: a half-width matmul
    that also wrote half-width sums ran several times slower on XLA's CPU backend
    (``experiments.bench_decode_forms``).
    """
    rows = math.prod(x_AX.shape[:-1])
    half = w_YX.dtype != jnp.float32
    reduce = (rows == 1 and half) or (1 < rows <= REDUCE_ROWS and not half)
    if reduce and jax.default_backend() == "cpu":
        # The barrier keeps x's broadcast apart per weight: XLA would otherwise merge the
        # identical broadcasts of two products of the same x (gate and up, or two experts)
        # and write the [A, Y, X] broadcast out whole before either reduce reads it.
        x_AX, w_YX = jax.lax.optimization_barrier((x_AX, w_YX))
        x_A1X = x_AX[..., None, :].astype(jnp.float32)
        w_1YX = w_YX.astype(jnp.float32).reshape((1,) * (x_AX.ndim - 1) + w_YX.shape)
        y_AY = jnp.sum(w_1YX * x_A1X, axis=-1)
        return y_AY.astype(x_AX.dtype)
    dims = (((x_AX.ndim - 1,), (1,)), ((), ()))
    y_AY = jax.lax.dot_general(x_AX, w_YX, dims, preferred_element_type=jnp.float32)
    return y_AY.astype(x_AX.dtype)


def expert_swiglu(x_AD: jax.Array, weights: ExpertWeights, e) -> jax.Array:
    """Expert e's SwiGLU of rows x, either layout (``e`` a Python int for the per-expert one)."""
    return swiglu(x_AD, *(w[e] for w in weights), split=is_split(weights[0]))


def is_split(w: Any) -> bool:
    """Whether ``w`` is in the per-expert layout (a tuple of arrays)."""
    return isinstance(w, (tuple, list))


def num_experts(w: Any) -> int:
    return len(w) if is_split(w) else w.shape[0]


def expert_shape(w: Any) -> tuple[int, ...]:
    """One expert's weight's shape [in, out], whichever layout ``w`` is in."""
    return tuple(reversed(w[0].shape)) if is_split(w) else tuple(w.shape[1:])


def cast(weights: ExpertWeights, dtype) -> ExpertWeights:
    """The weights in ``dtype``, either layout (a no-op where they already are)."""
    return tuple(
        tuple(a.astype(dtype) for a in w) if is_split(w) else w.astype(dtype) for w in weights
    )


def split_weights(weights: ExpertWeights, dtype=None) -> ExpertWeights:
    """The per-expert layout of (gate, up, down), in ``dtype`` (default: their own); eager."""
    if is_split(weights[0]):
        return weights if dtype is None else cast(weights, dtype)
    dt = weights[0].dtype if dtype is None else dtype
    # A transpose outside jit is a new array, [out, in] in memory.
    return tuple(tuple(jnp.asarray(w[e].T, dt) for e in range(w.shape[0])) for w in weights)


def stacked_weights(weights: ExpertWeights) -> ExpertWeights:
    """The stacked layout of (gate, up, down) (a copy when they are per expert)."""
    if not is_split(weights[0]):
        return weights
    return tuple(jnp.stack([w_YX.T for w_YX in w]) for w in weights)


def per_expert_swiglu(x_EAD: jax.Array, weights: ExpertWeights) -> jax.Array:
    """Every expert's SwiGLU on its own rows: x [E, A, D] -> [E, A, D] (capacity modes)."""
    if is_split(weights[0]):
        return jnp.stack([expert_swiglu(x_EAD[e], weights, e) for e in range(len(x_EAD))])
    return jax.vmap(swiglu)(x_EAD, *weights)
