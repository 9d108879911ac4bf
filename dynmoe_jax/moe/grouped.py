"""The grouped mode's buffer: one token budget per routing group, rows sorted by expert.

1. ``select`` (per group, vmapped over G): the priority list of the group's (rank, token)
   selections; a group keeps at most ``budget`` of them, any expert taking any share. When the
   group selects more, the lowest-priority ones are dropped (``DropOrder``).
2. ``layout`` (all groups at once, never vmapped): the kept selections of every group sorted by
   expert into one buffer of R rows, each expert's rows padded to a multiple of the block size b
   (``block_size``) so that a block of rows belongs to one expert. R is static:
   ``R = b * ceil((G * budget + E * (b - 1)) / b)`` bounds the rows in use, because padding
   adds at most b - 1 rows per expert.
3. ``rows.gather`` gathers each row's token; ``rows.scatter_add`` adds each row's output,
   weighted, back to its token. Padding rows read token 0 and are masked out of the combine.

The order of rows within an expert is the priority order, as in the capacity modes, so a
``capacity_factor=None`` run computes exactly what the index mode computes.

Drop order (``experiments/bench_moe.py --sections priority``; experiments/RESULTS.md): when
the budget binds, both orders drop as many selections and ``weight`` loses less of the
output. The default is ``rank``: it needs no sort, matches the capacity modes, and at the
budget factors worth running it drops nothing either way; ``weight`` is the better choice
under a budget that binds.

Axis letters (the package's glossary): G groups, S tokens per group, E experts, K ranks, P =
S * K priority entries of one group, Q = G * P entries of every group, R rows of the buffer, D
model width.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import experts, rows
from dynmoe_jax.moe.config import Backend, DropOrder
from dynmoe_jax.moe.kernels.grouped_swiglu import grouped_swiglu
from dynmoe_jax.moe.priority import priority_list, sort_by_expert


def num_rows(num_kept: int, num_experts: int, block_size: int) -> int:
    """R: rows for ``num_kept`` selections, each expert's run padded to whole blocks."""
    return block_size * math.ceil((num_kept + num_experts * (block_size - 1)) / block_size)


class Selections(NamedTuple):
    """A group's priority list after the budget.

    expert_P: int32[P], the expert of each kept selection, E for an entry that is not kept.
    token_P: int32[P], the token of each entry (``p % S``).
    weight_P: the combine weight of each entry (0 where not selected).
    """

    expert_P: jax.Array
    token_P: jax.Array
    weight_P: jax.Array


def select(
    mask_SE: jax.Array,
    rank_SE: jax.Array,
    weights_SE: jax.Array,
    budget: int,
    num_ranks: int,
    order: DropOrder = DropOrder.RANK,
) -> Selections:
    """Keeps at most ``budget`` of one group's selections, dropping the lowest priority first."""
    num_tokens, num_experts = mask_SE.shape
    key_P = priority_list(mask_SE, rank_SE, num_ranks)
    real_P = key_P < num_experts
    token_P = jnp.arange(key_P.shape[0], dtype=jnp.int32) % num_tokens
    weight_P = jnp.where(real_P, weights_SE[token_P, jnp.minimum(key_P, num_experts - 1)], 0)
    if order is DropOrder.RANK:
        # The list is already in priority order: keep the first `budget` real entries.
        place_P = jnp.cumsum(real_P, dtype=jnp.int32) - 1
    else:
        # Largest weight first; a stable sort keeps the priority order among equal weights.
        order_P = jnp.argsort(jnp.where(real_P, -weight_P, jnp.inf), stable=True)
        place_P = jnp.zeros_like(key_P).at[order_P].set(jnp.arange(key_P.shape[0], dtype=jnp.int32))
    kept_P = real_P & (place_P < budget)
    return Selections(jnp.where(kept_P, key_P, num_experts), token_P, weight_P)


def select_groups(
    mask_GSE: jax.Array,
    rank_GSE: jax.Array,
    weights_GSE: jax.Array,
    budget: int,
    num_ranks: int,
    order: DropOrder = DropOrder.RANK,
) -> Selections:
    """``select`` for every group: each group's selections kept under its budget ([G, P])."""
    fn = functools.partial(select, budget=budget, num_ranks=num_ranks, order=order)
    return jax.vmap(fn)(mask_GSE, rank_GSE, weights_GSE)


class Layout(NamedTuple):
    """The buffer's rows.

    token_R: int32[R], the token (over all groups, ``g * S + s``) whose selection fills the row.
    weight_R: the row's combine weight, 0 on padding rows.
    valid_R: bool[R], rows holding a kept selection.
    group_sizes_E: int32[E], rows per expert including block padding (multiples of b).
    """

    token_R: jax.Array
    weight_R: jax.Array
    valid_R: jax.Array
    group_sizes_E: jax.Array


def layout(
    sel: Selections, group_size: int, num_experts: int, block_size: int, rows: int
) -> Layout:
    """Sorts every group's kept selections (``sel`` fields [G, P]) by expert into R rows.

    ``sel.expert_P`` may hold ids >= num_experts for entries to leave out (not kept, or, under
    expert parallelism, another device's experts).
    """
    num_groups, num_entries = sel.expert_P.shape
    expert_Q = jnp.minimum(sel.expert_P, num_experts).reshape(-1)
    group_Q = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), num_entries)
    token_Q = group_Q * group_size + sel.token_P.reshape(-1)
    by = sort_by_expert(expert_Q, num_experts)
    padded_E = (by.counts_E + block_size - 1) // block_size * block_size
    padded_starts_E = jnp.cumsum(padded_E) - padded_E
    real_Q = by.expert_P < num_experts
    e_Q = jnp.minimum(by.expert_P, num_experts - 1)
    row_Q = padded_starts_E[e_Q] + jnp.arange(expert_Q.shape[0], dtype=jnp.int32) - by.starts_E[e_Q]
    row_Q = jnp.where(real_Q, row_Q, rows)  # out of range: dropped by the scatters below
    put = lambda v, fill: jnp.full((rows,), fill, v.dtype).at[row_Q].set(v, mode="drop")  # noqa: E731
    token_R = put(token_Q[by.selection_P], 0)
    weight_R = put(sel.weight_P.reshape(-1)[by.selection_P], 0)
    valid_R = put(real_Q, False)
    return Layout(token_R, weight_R, valid_R, padded_E.astype(jnp.int32))


def experts_on_selections(
    x_GSD: jax.Array,
    sel: Selections,
    weights: tuple[jax.Array, jax.Array, jax.Array],
    *,
    expert_offset: jax.Array | int,
    budget: int,
    block_size: int,
    backend: Backend | None,
) -> tuple[jax.Array, jax.Array]:
    """y_GSD of the experts ``expert_offset .. expert_offset + E_local - 1`` (``weights`` hold
    those E_local experts, in either layout of ``experts.py``), and the buffer rows computed
    (block padding included)."""
    g, s, d = x_GSD.shape
    num_local = experts.num_experts(weights[0])
    local_P = sel.expert_P - expert_offset
    mine_P = (local_P >= 0) & (local_P < num_local)
    sel = sel._replace(expert_P=jnp.where(mine_P, local_P, num_local))
    lay = layout(sel, s, num_local, block_size, num_rows(g * budget, num_local, block_size))
    x_RD = rows.gather(x_GSD.reshape(g * s, d), lay.token_R, lay.valid_R)
    # One fused chunk loop on CPU, three grouped matmuls elsewhere.
    y_RD = grouped_swiglu(x_RD, lay.group_sizes_E, *weights, block_size=block_size, backend=backend)
    y_MD = rows.scatter_add(y_RD, lay.token_R, lay.weight_R, lay.valid_R, g * s)
    return y_MD.reshape(g, s, d), jnp.sum(lay.group_sizes_E, dtype=jnp.float32)
