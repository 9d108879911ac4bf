"""Routing: router probabilities -> expert masks, combine weights and auxiliary losses.

Pure functions with static shapes; they work under ``jit``, ``vmap`` and ``grad``. Leading
dimensions are arbitrary (written ``...`` below); the last axis is always the expert axis E.

Axis letters (the package's glossary): M tokens (the leading axes flattened), E experts, K ranks
(an expert's place in a token's sorted order), A any axes.

Definitions follow Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE
Models" (ACL 2024):

* top-p: sort P descending, select the smallest prefix whose sum reaches the threshold; the
  expert that makes the sum cross the threshold is included; at least one expert; threshold 1
  selects every expert (the dense mixture).
* combine weights: top-p uses the raw probabilities, top-k renormalises over its choices.
* load balance ``N * sum_i f_i Q_i`` with f_i the fraction of tokens whose selected set holds
  expert i, and dynamic loss = router entropy.

Ties between equal probabilities always go to the lower expert index.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dynmoe_jax.moe.config import Router


class Routing(NamedTuple):
    """What dispatch needs from a router, for every token.

    mask: bool[..., E], the selected experts.
    rank: int32[..., E], the position of each expert in the token's descending order (0 = the
      most probable). Dispatch fills expert slots by rank first, then by token.
    weights: float32[..., E], combine weights, zero outside the mask.
    """

    mask: jax.Array
    rank: jax.Array
    weights: jax.Array


def descending_order(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sorts experts by descending probability, ties to the lower index.

    Returns (order, rank): ``order[..., r]`` is the expert at rank r and ``rank[..., e]`` the
    rank of expert e (the inverse permutation).
    """
    rank = _rank_by_counting(probs)
    return _inverse_permutation(rank), rank


def _on_expert_axis(v_E: jax.Array, probs: jax.Array) -> jax.Array:
    """A per-expert vector shaped to broadcast against ``probs`` [..., E] (ranks spelled out)."""
    return jnp.reshape(v_E, (1,) * (probs.ndim - 1) + (-1,))


def _rank_by_counting(probs: jax.Array) -> jax.Array:
    """rank[..., e] = how many experts come before e: a larger probability, or an equal one at
    a lower index (exactly the position in a stable descending sort).

    Why not argsort: XLA on CPU sorts each E-wide row through a comparator call per
    comparison, far slower than counting: E passes of elementwise compares over [..., E] (a
    loop, so the [..., E, E] comparison is never stored).
    """
    num_experts = probs.shape[-1]
    expert = _on_expert_axis(jnp.arange(num_experts), probs)

    def count_ahead(j, rank):
        p_j = jax.lax.dynamic_index_in_dim(probs, j, axis=-1, keepdims=True)
        ahead = (p_j > probs) | ((p_j == probs) & (j < expert))
        return rank + ahead.astype(jnp.int32)

    zeros = jnp.zeros(probs.shape, jnp.int32)
    return jax.lax.fori_loop(0, num_experts, count_ahead, zeros, unroll=min(8, num_experts))


def _inverse_permutation(rank: jax.Array) -> jax.Array:
    """order[..., rank[..., e]] = e, as one scatter."""
    num_experts = rank.shape[-1]
    rank_ME = rank.reshape(-1, num_experts)
    row_M1 = jnp.arange(rank_ME.shape[0])[:, None]
    expert_E = jnp.arange(num_experts, dtype=jnp.int32)
    order_ME = jnp.zeros_like(rank_ME).at[row_M1, rank_ME].set(expert_E, unique_indices=True)
    return order_ME.reshape(rank.shape)


def _top_p_by_rank(
    probs: jax.Array, threshold: float | jax.Array, max_k: int | None, scores: jax.Array
) -> tuple:
    order, rank = descending_order(scores)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    # Rank r is selected while the mass of the ranks before it is still below the threshold:
    # this includes the expert whose probability crosses it, and always rank 0. The mass before
    # rank r is the stored prefix sum up to r - 1 (shifted in, exclusive), never
    # `cumsum - p_r`: that subtraction rounds in float32 and can land back on the threshold
    # when the sum before r is 1 ulp below it, which left the crossing expert out.
    mass_before = _exclusive_cumsum(sorted_probs)
    positions = _on_expert_axis(jnp.arange(probs.shape[-1]), probs)
    # threshold 1 is the whole mixture: in float32 the prefix sum reaches 1 before the last
    # experts whenever they hold less than its rounding error, which would leave them out.
    selected_by_rank = (mass_before < threshold) | (positions == 0) | (threshold >= 1.0)
    if max_k is not None:
        selected_by_rank &= positions < max_k
    mask = jnp.take_along_axis(selected_by_rank, rank, axis=-1)
    return mask, rank


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
    """Prefix sums along the last axis that exclude the element itself: [0, x0, x0+x1, ...]."""
    inclusive = jnp.cumsum(x, axis=-1)
    zeros = jnp.zeros_like(inclusive[..., :1])
    return jnp.concatenate([zeros, inclusive[..., :-1]], axis=-1)


def top_p_mask(probs: jax.Array, threshold: float, max_k: int | None = None) -> jax.Array:
    """The paper's top-p rule: bool[..., E] marking the smallest prefix of the experts, sorted by
    descending probability, whose probabilities sum to at least ``threshold``.

    ``max_k`` caps the number selected (None: no cap, as in the paper).
    """
    return _top_p_by_rank(probs, threshold, max_k, probs)[0]


def top_k_mask(probs: jax.Array, k: int) -> jax.Array:
    """bool[..., E] marking the k most probable experts (ties to the lower index)."""
    _, rank = descending_order(probs)
    return rank < k


def combine_weights(probs: jax.Array, mask: jax.Array, renormalize: bool) -> jax.Array:
    """Weights of each expert's output: the probabilities on the mask, optionally renormalised
    to sum to one over the selected experts (the paper's top-k baseline)."""
    weights = jnp.where(mask, probs, 0.0)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights


def route(
    probs: jax.Array,
    router: Router | str,
    *,
    threshold: float = 0.4,
    top_k: int = 2,
    max_k: int | None = None,
    renormalize: bool | None = None,
    bias: jax.Array | None = None,
) -> Routing:
    """Applies a routing rule to float32 probabilities.

    ``renormalize=None`` picks the paper's choice: raw probabilities for top-p, renormalised for
    top-k. ``threshold`` may be a traced scalar (a controller's). ``bias`` [E] (aux-loss-free
    balancing) moves experts in the order of selection only: experts are ranked by
    ``log P + bias``, top-k takes the first k of that order, and top-p walks it summing the
    unbiased probabilities until they reach the threshold; the combine weights stay the
    unbiased probabilities.
    """
    router = Router(router)
    scores = probs if bias is None else jnp.log(probs) + _on_expert_axis(bias, probs)
    if router is Router.TOP_P:
        mask, rank = _top_p_by_rank(probs, threshold, max_k, scores)
    else:
        rank = descending_order(scores)[1]
        mask = rank < top_k
    if renormalize is None:
        renormalize = router is Router.TOP_K
    return Routing(mask, rank, combine_weights(probs, mask, renormalize))


def token_mean(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean over the tokens (every axis but the last) of x [..., A], over the tokens where
    ``valid`` [...] holds when given (padding left out); 0 when no token is valid."""
    x_MA = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if valid is None:
        return jnp.mean(x_MA, axis=0)
    w_M1 = valid.reshape(-1, 1).astype(jnp.float32)
    return jnp.sum(x_MA * w_M1, axis=0) / jnp.maximum(jnp.sum(w_M1), 1.0)


def load_balance_loss(
    probs: jax.Array, mask: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """``N * sum_i f_i * Q_i``: f_i the fraction of tokens whose selected set holds expert i,
    Q_i the mean router probability of expert i, both over the tokens given (the ``valid``
    ones, when given).

    f is a count and carries no gradient; the router learns through Q. Because
    ``sum_i f_i`` is the mean number of selected experts, the loss also grows with it.
    """
    num_experts = probs.shape[-1]
    f = jax.lax.stop_gradient(token_mean(mask, valid))
    q = token_mean(probs, valid)
    return num_experts * jnp.sum(f * q)


def dynamic_loss(logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Router entropy ``-sum_i P_i log P_i``, averaged over the (valid) tokens: the paper's
    L_d."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1, keepdims=True)
    return token_mean(entropy, valid)[0]


def z_loss(logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Router z-loss (ST-MoE): mean of ``logsumexp(logits)^2`` over the (valid) tokens."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1, keepdims=True)
    return token_mean(jnp.square(lse), valid)[0]
