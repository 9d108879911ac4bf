"""Dispatch: send each group's tokens to fixed-capacity expert buffers and combine the outputs.

Pure functions over one group of S tokens; ``moe.py`` vmaps them over the G groups.

Axis letters: S tokens per group, D model width, E experts, C capacity (slots per expert).

Slots are filled in priority order: every token's rank-0 choice (in token order) before any
token's rank-1 choice, and so on. A selection that finds its expert full is dropped: it
contributes nothing and the caller's residual carries the token.

Two interchangeable modes:

* ``einsum``: one-hot dispatch and combine tensors of shape [S, E, C]; simple, memory
  quadratic in the group size.
* ``index``: an [E, C] table of token ids; gather in, scatter-add out; no [S, E, C] tensor.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Dispatch(str, enum.Enum):
    EINSUM = "einsum"
    INDEX = "index"


class Slots(NamedTuple):
    """Where each selection of one group goes.

    token_EC: int32[E, C], the token filling each slot (0 for an empty slot).
    valid_EC: bool[E, C], whether the slot is filled.
    slot_SE: int32[S, E], the slot of each selection; meaningful only where kept_SE.
    kept_SE: bool[S, E], selections that found room.
    """

    token_EC: jax.Array
    valid_EC: jax.Array
    slot_SE: jax.Array
    kept_SE: jax.Array


def capacity(
    group_size: int, num_experts: int, expected_k: float, capacity_factor: float | None
) -> int:
    """Slots per expert per group: ``ceil(capacity_factor * S * expected_k / E)``, at least 1
    and at most S (a token visits an expert at most once). ``None`` means no dropping."""
    if capacity_factor is None:
        return group_size
    c = math.ceil(capacity_factor * group_size * expected_k / num_experts)
    return max(1, min(group_size, c))


def assign_slots(mask_SE: jax.Array, rank_SE: jax.Array, num_slots: int) -> Slots:
    """Gives every selection its slot in its expert, in priority order (rank, then token)."""
    num_tokens, num_experts = mask_SE.shape
    unselected = num_tokens * num_experts  # sorts after every real priority key
    token_S = jnp.arange(num_tokens, dtype=jnp.int32)
    key_ES = jnp.where(mask_SE, rank_SE * num_tokens + token_S[:, None], unselected).T
    # Sorting each expert's keys lists its selections in priority order: position = slot.
    order_ES = jnp.argsort(key_ES, axis=-1).astype(jnp.int32)
    sorted_key_ES = jnp.take_along_axis(key_ES, order_ES, axis=-1)
    slot_ES = jnp.argsort(order_ES, axis=-1).astype(jnp.int32)
    slot_SE = slot_ES.T
    return Slots(
        token_EC=order_ES[:, :num_slots],
        valid_EC=sorted_key_ES[:, :num_slots] < unselected,
        slot_SE=slot_SE,
        kept_SE=mask_SE & (slot_SE < num_slots),
    )


def _one_hot_dispatch_SEC(slots: Slots, num_slots: int, dtype) -> jax.Array:
    kept_SE1 = slots.kept_SE[..., None].astype(dtype)
    return jax.nn.one_hot(slots.slot_SE, num_slots, dtype=dtype) * kept_SE1


def einsum_dispatch(x_SD: jax.Array, slots: Slots, num_slots: int) -> jax.Array:
    """x_SD -> x_ECD through a one-hot [S, E, C] dispatch tensor."""
    return jnp.einsum("SEC,SD->ECD", _one_hot_dispatch_SEC(slots, num_slots, x_SD.dtype), x_SD)


def einsum_combine(
    y_ECD: jax.Array, weights_SE: jax.Array, slots: Slots, num_slots: int
) -> jax.Array:
    """y_ECD -> y_SD, each kept selection weighted by its combine weight."""
    dispatch_SEC = _one_hot_dispatch_SEC(slots, num_slots, y_ECD.dtype)
    combine_SEC = dispatch_SEC * weights_SE[..., None].astype(y_ECD.dtype)
    return jnp.einsum("SEC,ECD->SD", combine_SEC, y_ECD)


def index_dispatch(x_SD: jax.Array, slots: Slots, num_slots: int) -> jax.Array:
    """x_SD -> x_ECD by gathering the token ids of the slot table."""
    del num_slots  # implied by the table's shape
    # Empty slots hold zeros, so the experts compute zeros there (SwiGLU has no bias).
    return jnp.where(slots.valid_EC[..., None], x_SD[slots.token_EC], 0).astype(x_SD.dtype)


def index_combine(
    y_ECD: jax.Array, weights_SE: jax.Array, slots: Slots, num_slots: int
) -> jax.Array:
    """y_ECD -> y_SD by scatter-adding each slot's weighted output to its token."""
    del num_slots
    token_EC = slots.token_EC
    expert_E1 = jnp.arange(weights_SE.shape[1])[:, None]
    w_EC = jnp.where(slots.valid_EC, weights_SE[token_EC, expert_E1], 0.0).astype(y_ECD.dtype)
    num_tokens = weights_SE.shape[0]
    y_SD = jnp.zeros((num_tokens, y_ECD.shape[-1]), y_ECD.dtype)
    return y_SD.at[token_EC].add(w_EC[..., None] * y_ECD)


class DispatchFns(NamedTuple):
    dispatch: Callable[[jax.Array, Slots, int], jax.Array]
    combine: Callable[[jax.Array, jax.Array, Slots, int], jax.Array]


DISPATCH_FNS = {
    Dispatch.EINSUM: DispatchFns(einsum_dispatch, einsum_combine),
    Dispatch.INDEX: DispatchFns(index_dispatch, index_combine),
}
