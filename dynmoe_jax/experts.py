"""The SwiGLU feed-forward, and the two layouts of E experts' weights.

``swiglu(x, w_gate, w_up, w_down) = (silu(x @ w_gate) * (x @ w_up)) @ w_down`` is the one
definition: the dense layers, the shared expert, every MoE path and the benchmarks' ideals
call it.

An MoE layer's three weights come in one of two layouts (``ExpertWeights``):

* **stacked**: one array per weight with a leading expert axis, [E, D, F], [E, D, F],
  [E, F, D]. Training, checkpoints, imports and sharding over the ``expert`` mesh axis use it.
* **per expert**: a tuple of E arrays per weight, [D, F], [D, F], [F, D] each, in the compute
  dtype. The decode layout (``split``), made once outside ``jit``: XLA on CPU copies a slice of
  a stacked parameter before a matmul reads it, even a static one, so a decode step that reads
  only its tokens' experts pays a copy of each; separate arrays are read where they lie. The
  layer's paths take either layout, forward only for the per-expert one.

Axis letters: E experts, N rows (tokens), D model width, F hidden width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# (gate, up, down): stacked arrays, or tuples of E per-expert arrays.
ExpertWeights = tuple[Any, Any, Any]
NAMES = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")  # the MoE layer's parameters, in that order


def swiglu(x_ND: jax.Array, w_gate_DF, w_up_DF, w_down_FD) -> jax.Array:
    """SwiGLU of rows x [..., D] through one expert's (or a dense layer's) weights."""
    return (jax.nn.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_down_FD


def is_split(w: Any) -> bool:
    """Whether ``w`` is in the per-expert layout (a tuple of arrays)."""
    return isinstance(w, (tuple, list))


def num_experts(w: Any) -> int:
    return len(w) if is_split(w) else w.shape[0]


def expert_shape(w: Any) -> tuple[int, ...]:
    """The shape of one expert's slice of the weight ``w``."""
    return tuple(w[0].shape) if is_split(w) else tuple(w.shape[1:])


def cast(weights: ExpertWeights, dtype) -> ExpertWeights:
    """The weights in ``dtype``, either layout (a no-op where they already are)."""
    return tuple(
        tuple(a.astype(dtype) for a in w) if is_split(w) else w.astype(dtype) for w in weights
    )


def stacked(w: Any) -> jax.Array:
    """One weight in the stacked layout (a copy when it is split)."""
    return jnp.stack(w) if is_split(w) else w


def split(w_EXY: jax.Array, dtype=None) -> tuple[jax.Array, ...]:
    """One stacked weight as E separate arrays, in ``dtype`` (default: its own)."""
    if is_split(w_EXY):
        return tuple(a if dtype is None else a.astype(dtype) for a in w_EXY)
    dtype = w_EXY.dtype if dtype is None else dtype
    return tuple(w_EXY[e].astype(dtype) for e in range(w_EXY.shape[0]))


def per_expert_swiglu(x_END: jax.Array, weights: ExpertWeights) -> jax.Array:
    """Every expert's SwiGLU on its own rows: x [E, N, D] -> [E, N, D] (capacity modes)."""
    if is_split(weights[0]):
        return jnp.stack([swiglu(x_END[e], *(w[e] for w in weights)) for e in range(len(x_END))])
    w_gate_EDF, w_up_EDF, w_down_EFD = weights
    gate_ENF = jnp.einsum("END,EDF->ENF", x_END, w_gate_EDF)
    up_ENF = jnp.einsum("END,EDF->ENF", x_END, w_up_EDF)
    return jnp.einsum("ENF,EFD->END", jax.nn.silu(gate_ENF) * up_ENF, w_down_EFD)
