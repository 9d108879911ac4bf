"""The selection priority that every dispatch mode shares.

Priority: every token's rank-0 choice (in token order) before any token's rank-1 choice, and so
on. The list of (rank, token) selections in that order is sorted by expert with one sort of
packed integer keys; each expert's run of the sorted list is then in priority order.

Axis letters: S tokens per group, E experts, K ranks a token may select (a static bound),
P = S * K entries of the priority list.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_INT32_MAX = 2**31 - 1


class ByExpert(NamedTuple):
    """A group's selections sorted by expert; within an expert, in priority order.

    selection_P: int32[P], the priority-list index ``rank * S + token`` at each sorted position.
    expert_P: int32[P], the expert at each sorted position (E after the last real selection).
    counts_E: int32[E], selections per expert (the ragged group sizes).
    starts_E: int32[E], where each expert's run begins in the sorted list.
    """

    selection_P: jax.Array
    expert_P: jax.Array
    counts_E: jax.Array
    starts_E: jax.Array


def priority_list(mask_SE: jax.Array, rank_SE: jax.Array, num_ranks: int) -> jax.Array:
    """int32[P]: the expert of each (rank, token) selection at index ``rank * S + token``, and
    E where the token selects fewer than ``rank + 1`` experts. Ranks >= num_ranks are left out.
    """
    num_tokens, num_experts = mask_SE.shape
    n = num_tokens * num_ranks
    token_S1 = jnp.arange(num_tokens, dtype=jnp.int32)[:, None]
    index_SE = jnp.where(mask_SE & (rank_SE < num_ranks), rank_SE * num_tokens + token_S1, n)
    expert_SE = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), mask_SE.shape)
    # A scatter of S*E ids (not a one-hot over ranks, which would be S*K*E); index n is dropped.
    empty_P = jnp.full((n,), num_experts, jnp.int32)
    return empty_P.at[index_SE.reshape(-1)].set(expert_SE.reshape(-1), mode="drop")


def sort_by_expert(key_P: jax.Array, num_experts: int) -> ByExpert:
    """Stable sort of the priority list by expert (``key_P`` from ``priority_list``)."""
    n = key_P.shape[0]
    iota_P = jnp.arange(n, dtype=jnp.int32)
    if (num_experts + 1) * n <= _INT32_MAX:
        # Packing (expert, position) into one int32 makes keys unique, so a plain sort is stable
        # and sorts one array instead of a key-value pair (faster on CPU).
        packed_P = jax.lax.sort(key_P * n + iota_P)
        selection_P, expert_P = packed_P % n, packed_P // n
    else:
        expert_P, selection_P = jax.lax.sort((key_P, iota_P), num_keys=1, is_stable=True)
    counts_E = jnp.bincount(key_P, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    starts_E = jnp.cumsum(counts_E) - counts_E
    return ByExpert(selection_P, expert_P, counts_E, starts_E)
