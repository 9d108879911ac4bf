"""The capacity modes: every expert gets C slots per routing group, filled in priority order.

Pure functions over one group of S tokens; the layer vmaps them over the G groups.

* ``einsum``: one-hot dispatch and combine tensors [S, E, C]; memory and FLOPs grow with S^2.
* ``index``: an [E, C] table of token ids; gather in, scatter-add out; O(E * C * D).

A selection that finds its expert full is dropped: it contributes nothing and the caller's
residual carries the token.

Axis letters: S tokens per group, D model width, E experts, C capacity (slots per expert),
P = S * K entries of the priority list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import rows
from dynmoe_jax.moe.priority import ByExpert, priority_list, sort_by_expert


class Slots(NamedTuple):
    """Where each selection of one group goes.

    token_EC: int32[E, C], the token filling each slot (0 for an empty slot).
    valid_EC: bool[E, C], whether the slot is filled.
    slot_SE: int32[S, E], the slot of each kept selection; C where nothing is kept.
    kept_SE: bool[S, E], selections that found room.
    """

    token_EC: jax.Array
    valid_EC: jax.Array
    slot_SE: jax.Array
    kept_SE: jax.Array


def _slot_per_selection(by: ByExpert, num_slots: int) -> jax.Array:
    """int32[P]: each selection's slot (its place in its expert's run), C if it has none."""
    n = by.selection_P.shape[0]
    num_experts = by.counts_E.shape[0]
    real_P = by.expert_P < num_experts
    start_P = by.starts_E[jnp.minimum(by.expert_P, num_experts - 1)]
    slot_sorted_P = jnp.where(real_P, jnp.arange(n, dtype=jnp.int32) - start_P, num_slots)
    slot_sorted_P = jnp.minimum(slot_sorted_P, num_slots)
    # selection_P is a permutation: scattering through it undoes the sort.
    return jnp.zeros((n,), jnp.int32).at[by.selection_P].set(slot_sorted_P, unique_indices=True)


def assign_slots(
    mask_SE: jax.Array, rank_SE: jax.Array, num_slots: int, num_ranks: int | None = None
) -> Slots:
    """Gives every selection its slot in its expert, in priority order (rank, then token).

    ``num_ranks`` bounds the ranks a token may select (None: E); a tight bound (top-k's k,
    ``MoEConfig.max_selections`` for top-p) keeps the priority list short.
    """
    num_tokens, num_experts = mask_SE.shape
    num_ranks = num_experts if num_ranks is None else num_ranks
    by = sort_by_expert(priority_list(mask_SE, rank_SE, num_ranks), num_experts)
    n = by.selection_P.shape[0]
    c_1C = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    valid_EC = c_1C < by.counts_E[:, None]
    selection_EC = by.selection_P[jnp.minimum(by.starts_E[:, None] + c_1C, n - 1)]
    token_EC = jnp.where(valid_EC, selection_EC % num_tokens, 0)
    # Only the einsum mode reads slot_SE and kept_SE; under jit XLA drops them otherwise.
    token_S1 = jnp.arange(num_tokens, dtype=jnp.int32)[:, None]
    listed_SE = mask_SE & (rank_SE < num_ranks)
    index_SE = jnp.minimum(rank_SE * num_tokens + token_S1, n - 1)
    slot_SE = jnp.where(listed_SE, _slot_per_selection(by, num_slots)[index_SE], num_slots)
    return Slots(token_EC, valid_EC, slot_SE, slot_SE < num_slots)


def _one_hot_dispatch_SEC(slots: Slots, num_slots: int, dtype) -> jax.Array:
    # slot_SE == C (nothing kept) one-hot encodes to a zero row.
    return jax.nn.one_hot(slots.slot_SE, num_slots, dtype=dtype)


def einsum_dispatch(x_SD: jax.Array, slots: Slots, num_slots: int) -> jax.Array:
    """x_SD -> x_ECD through a one-hot [S, E, C] dispatch tensor."""
    return jnp.einsum("SEC,SD->ECD", _one_hot_dispatch_SEC(slots, num_slots, x_SD.dtype), x_SD)


def einsum_combine(
    y_ECD: jax.Array, weights_SE: jax.Array, slots: Slots, num_slots: int
) -> jax.Array:
    """y_ECD -> y_SD, each kept selection weighted by its combine weight."""
    dispatch_SEC = _one_hot_dispatch_SEC(slots, num_slots, y_ECD.dtype)
    # Weighting the [E, C] slots, not the [S, E, C] tensor, spares the backward pass an
    # S*E*C*D einsum for the weights' gradient.
    w_EC = jnp.einsum("SEC,SE->EC", dispatch_SEC, weights_SE.astype(y_ECD.dtype))
    return jnp.einsum("SEC,ECD->SD", dispatch_SEC, y_ECD * w_EC[..., None])


def index_dispatch(x_SD: jax.Array, slots: Slots, num_slots: int) -> jax.Array:
    """x_SD -> x_ECD by gathering the token ids of the slot table."""
    del num_slots  # implied by the table's shape
    return rows.gather(x_SD, slots.token_EC, slots.valid_EC)


def index_combine(
    y_ECD: jax.Array, weights_SE: jax.Array, slots: Slots, num_slots: int
) -> jax.Array:
    """y_ECD -> y_SD by scatter-adding each slot's weighted output to its token."""
    del num_slots
    expert_E1 = jnp.arange(weights_SE.shape[1])[:, None]
    w_EC = weights_SE[slots.token_EC, expert_E1]
    return rows.scatter_add(y_ECD, slots.token_EC, w_EC, slots.valid_EC, weights_SE.shape[0])


class DispatchFns(NamedTuple):
    dispatch: Callable[[jax.Array, Slots, int], jax.Array]
    combine: Callable[[jax.Array, jax.Array, Slots, int], jax.Array]


# The capacity modes (the grouped mode gathers and scatters its buffer's rows in grouped.py).
DISPATCH_FNS = {
    "einsum": DispatchFns(einsum_dispatch, einsum_combine),
    "index": DispatchFns(index_dispatch, index_combine),
}
