"""Capacity modes (index, einsum): the capacity formula, slot assignment in priority order and
dispatch/combine, on hand-worked groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.moe import capacity, routing


def test_priority_rank_before_token_order():
    # Expert 0 is wanted by tokens 0 and 3 as a second choice and by 1 and 2 as a first
    # choice. With two slots, the first choices win although token 0 comes first.
    mask = jnp.asarray([[1, 1], [1, 0], [1, 0], [1, 1]], bool)
    rank = jnp.asarray([[1, 0], [0, 1], [0, 1], [1, 0]], jnp.int32)
    slots = capacity.assign_slots(mask, rank, num_slots=2)
    np.testing.assert_array_equal(slots.kept_SE[:, 0], [False, True, True, False])
    np.testing.assert_array_equal(slots.token_EC[0], [1, 2])
    np.testing.assert_array_equal(slots.valid_EC[0], [True, True])
    # Expert 1 has two first choices (tokens 0, 3): both fit, in token order.
    np.testing.assert_array_equal(slots.token_EC[1], [0, 3])
    np.testing.assert_array_equal(slots.slot_SE[[0, 3], 1], [0, 1])


def test_empty_slots_are_marked_invalid():
    mask = jnp.asarray([[1, 0], [1, 0], [0, 1]], bool)
    rank = jnp.asarray([[0, 1], [0, 1], [1, 0]], jnp.int32)
    slots = capacity.assign_slots(mask, rank, num_slots=3)
    np.testing.assert_array_equal(slots.valid_EC, [[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(slots.kept_SE, mask)


@pytest.mark.parametrize("mode", list(capacity.DISPATCH_FNS))
def test_dispatch_then_combine_hand_worked(mode):
    # Three tokens, two experts, one slot each: token 2's choice of expert 0 is dropped.
    x = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    mask = jnp.asarray([[1, 0], [0, 1], [1, 0]], bool)
    rank = jnp.zeros((3, 2), jnp.int32).at[:, 1].set(1).at[1].set(jnp.asarray([1, 0]))
    weights = jnp.asarray([[0.5, 0.0], [0.0, 0.25], [0.9, 0.0]])
    slots = capacity.assign_slots(mask, rank, num_slots=1)
    fns = capacity.DISPATCH_FNS[mode]
    x_ECD = fns.dispatch(x, slots, 1)
    np.testing.assert_array_equal(x_ECD, [[[1.0, 0.0]], [[0.0, 2.0]]])
    y_ECD = x_ECD * jnp.asarray([10.0, 100.0])[:, None, None]  # expert e scales by 10^(e+1)
    y = fns.combine(y_ECD, weights, slots, 1)
    np.testing.assert_allclose(y, [[5.0, 0.0], [0.0, 50.0], [0.0, 0.0]])


def test_modes_agree_on_random_groups_with_drops():
    key_x, key_p = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (32, 4))
    probs = jax.nn.softmax(2 * jax.random.normal(key_p, (32, 8)))
    r = routing.route(probs, "top_p", threshold=0.6)
    slots = capacity.assign_slots(r.mask, r.rank, num_slots=3)
    assert int(jnp.sum(r.mask)) > int(jnp.sum(slots.kept_SE))  # some drops happen
    outs = []
    for fns in capacity.DISPATCH_FNS.values():
        x_ECD = fns.dispatch(x, slots, 3)
        outs.append(fns.combine(jnp.tanh(x_ECD), r.weights, slots, 3))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_rank_bound_gives_same_slots():
    probs = jax.nn.softmax(3 * jax.random.normal(jax.random.key(4), (64, 8)))
    r = routing.route(probs, "top_k", top_k=2)
    full = capacity.assign_slots(r.mask, r.rank, num_slots=12)
    bounded = capacity.assign_slots(r.mask, r.rank, num_slots=12, num_ranks=2)
    jax.tree.map(np.testing.assert_array_equal, full, bounded)


def test_slot_assignment_never_builds_S_E_E():
    s, e = 128, 16
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(5), (s, e)))
    r = routing.route(probs, "top_p", threshold=0.9)
    jaxpr = jax.make_jaxpr(lambda m, k: capacity.assign_slots(m, k, num_slots=20))(r.mask, r.rank)
    sizes = [v.aval.size for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "size")]
    assert max(sizes) <= s * e  # S*E priority-list entries at most, never S*E*E
