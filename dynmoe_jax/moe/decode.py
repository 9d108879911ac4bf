"""The decode path: a call with few tokens reads only the experts that its tokens selected.

With a few tokens per call (decode steps, small batches) an MoE layer is bound by reading
expert weights, not by arithmetic. This path lists the u experts that some token of the call
selected and runs each of them, adding each output with the token's combine weight (zero where
the token did not select that expert): u weight reads. Through the CPU kernel
(``kernels.cpu_swiglu``) an expert computes only the tokens that selected it; otherwise every
token of the call runs through each of the u experts (u * M rows). u is a traced count, so one
compiled program serves every k and every p; the loop has a static length W (at most every
expert the call could select) and its steps past u do nothing. When every expert is in use
the loop gives way to a plain sum over all of them.

Weights in the per-expert layout (``experts.split_weights``) are reached through a switch over the E
experts, each branch reading its own arrays where they lie. Stacked weights are indexed by
the expert id: on GPU and TPU the slice feeds the matmul, on CPU it is a copy per expert
(hence the decode layout). Nothing is ever dropped, so the path serves only calls whose
configured dispatch could drop nothing either (``MoEConfig.takes_decode_path``).

Axis letters (the package's glossary): M tokens of the call, E experts, W the loop's length,
D model width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import experts
from dynmoe_jax.moe.experts import ExpertWeights
from dynmoe_jax.moe.kernels import cpu_swiglu


def selected_experts(
    x_MD: jax.Array,
    mask_ME: jax.Array,
    weights_ME: jax.Array,
    weights: ExpertWeights,
    max_used: int,
    kernel: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(y_MD, u): the sum over each token's selected experts of weight * SwiGLU, and the number
    of experts computed. ``weights`` hold the experts of ``mask_ME``'s columns; ``max_used``
    bounds how many of them one call selects (the loop's length). ``kernel``: per-expert
    weights run through the CPU kernel (``kernels.cpu_swiglu``), which computes only the
    tokens that selected each expert."""
    num_experts = mask_ME.shape[1]
    used_E = jnp.any(mask_ME, axis=0)
    used = jnp.sum(used_E, dtype=jnp.int32)

    run = _expert_fn(weights, kernel)

    def weighted(e):
        # `where`: a token that did not select e adds nothing, whatever e computes for it.
        took_M = jax.lax.dynamic_index_in_dim(mask_ME, e, axis=1, keepdims=False)
        w_M1 = jax.lax.dynamic_index_in_dim(weights_ME, e, axis=1).astype(x_MD.dtype)
        return jnp.where(took_M[:, None], w_M1 * run(e, x_MD, took_M), 0)

    def some():
        ids_W = jnp.nonzero(used_E, size=max_used, fill_value=0)[0].astype(jnp.int32)

        def step(i, y_MD):
            add = lambda y_MD: y_MD + weighted(ids_W[i])  # noqa: E731
            return jax.lax.cond(i < used, add, lambda y_MD: y_MD, y_MD)

        return jax.lax.fori_loop(0, max_used, step, jnp.zeros_like(x_MD))

    def every():
        # Every expert in use: no loop and no branch, so XLA may run the experts side by side.
        return sum(weighted(e) for e in range(num_experts))

    if max_used < num_experts:  # the call cannot select every expert
        return some(), used
    return jax.lax.cond(used == num_experts, every, some), used


def _expert_fn(weights: ExpertWeights, kernel: bool):
    """(e, x_MD, take_M) -> expert e's SwiGLU of x (of the rows with take_M at least), for
    either layout; e a Python int or a traced one."""
    if not experts.is_split(weights[0]):
        return lambda e, x_MD, take_M: experts.expert_swiglu(x_MD, weights, e)

    def one(j, x_MD, take_M):
        if kernel:
            return cpu_swiglu.expert_swiglu(x_MD, take_M, *(w[j] for w in weights))
        return experts.expert_swiglu(x_MD, weights, j)

    branches = [functools.partial(one, j) for j in range(len(weights[0]))]

    def run(e, x_MD, take_M):
        if isinstance(e, int):
            return branches[e](x_MD, take_M)
        return jax.lax.switch(e, branches, x_MD, take_M)

    return run
