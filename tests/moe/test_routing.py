"""Routing rules and aux losses against float64 NumPy references and hand-worked rows, and the
biased order of selection (routing that keeps its budget) against a float64 reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.moe import routing
from tests import reference as ref


def _as_sets(mask) -> list[set[int]]:
    return [set(np.flatnonzero(row).tolist()) for row in np.asarray(mask)]


def _random_probs(num_rows, num_experts, seed, scale):
    logits = np.random.default_rng(seed).normal(size=(num_rows, num_experts)) * scale
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def _near_threshold(p, threshold, tol=1e-5):
    """Rows where some prefix sum sits within float32 rounding of the threshold: there float32
    and float64 may legitimately disagree, so they are left out of the exact comparison."""
    # Only the sums of the first 1..E-1 ranks decide anything: the total never gates a rank.
    prefix = np.cumsum(np.sort(p.astype(np.float64))[::-1])[:-1]
    return bool(np.any(np.abs(prefix - threshold) < tol))


@pytest.mark.parametrize("num_experts", [4, 16, 64])
@pytest.mark.parametrize("threshold", [0.1, 0.4, 0.75, 1.0])
@pytest.mark.parametrize("max_k", [None, 2])
def test_top_p_matches_float64_reference(num_experts, threshold, max_k):
    probs = _random_probs(3000, num_experts, seed=num_experts, scale=2.0)
    got = _as_sets(jax.jit(routing.top_p_mask, static_argnums=(1, 2))(probs, threshold, max_k))
    compared = 0
    for row, p in enumerate(probs):
        if _near_threshold(p, threshold):
            continue
        assert got[row] == set(ref.top_p_set(p, threshold, max_k)), (row, p)
        compared += 1
    assert compared >= 2900 or threshold == 1.0
    if threshold == 1.0:
        assert all(len(row) == (max_k or num_experts) for row in got)  # every row, no exception


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_matches_float64_reference(k):
    probs = _random_probs(2000, 8, seed=k, scale=1.5)
    got = _as_sets(routing.top_k_mask(jnp.asarray(probs), k))
    assert got == [set(ref.top_k_set(p, k)) for p in probs]


HAND_ROWS = [
    # (probs, threshold, max_k, expected set, what it checks)
    ([0.2, 0.3, 0.3, 0.2], 0.3, None, {1}, "tie at the top goes to the lower index"),
    ([0.2, 0.3, 0.3, 0.2], 0.5, None, {1, 2}, "crossing expert included"),
    ([0.2, 0.3, 0.3, 0.2], 0.7, None, {0, 1, 2}, "tie in the tail goes to the lower index"),
    ([0.5, 0.25, 0.125, 0.125], 0.75, None, {0, 1}, "sum exactly equal stops there"),
    ([0.25, 0.25, 0.25, 0.25], 0.5, None, {0, 1}, "uniform, exact equality"),
    ([0.25, 0.25, 0.25, 0.25], 0.51, None, {0, 1, 2}, "uniform, just past"),
    ([0.5, 0.25, 0.125, 0.125], 1.0, None, {0, 1, 2, 3}, "threshold 1.0 takes all mass"),
    ([0.5, 0.5, 0.0, 0.0], 1.0, None, {0, 1, 2, 3}, "threshold 1.0 takes every expert"),
    ([0.7, 0.3, 1e-9, 1e-9], 1.0, None, {0, 1, 2, 3}, "even below the sum's rounding error"),
    ([0.1, 0.2, 0.3, 0.4], 1e-6, None, {3}, "tiny threshold is top-1"),
    ([0.01, 0.97, 0.01, 0.01], 0.4, None, {1}, "one dominant expert"),
    ([0.125] * 8, 0.9, None, set(range(8)), "uniform 8, high threshold: all"),
    ([0.125] * 8, 0.9, 3, {0, 1, 2}, "max_k caps the count"),
    ([0.125] * 8, 0.1, 3, {0}, "max_k does not add experts"),
]


@pytest.mark.parametrize("probs, threshold, max_k, expected, why", HAND_ROWS)
def test_top_p_hand_worked(probs, threshold, max_k, expected, why):
    got = _as_sets(routing.top_p_mask(jnp.asarray([probs], jnp.float32), threshold, max_k))[0]
    assert got == expected, why
    assert set(ref.top_p_set(np.asarray(probs), threshold, max_k)) == expected, why


def _one_ulp_below_rows(threshold: float, num_experts: int, num_rows: int) -> np.ndarray:
    """float32 rows whose top expert holds 1 ulp less than the threshold, with the rest of the
    mass spread at random over the other experts, each below the top one."""
    p32 = np.float32(threshold)
    top = np.nextafter(p32, np.float32(0))
    rng = np.random.default_rng(num_experts * 1000 + int(threshold * 100))
    rows = []
    while len(rows) < num_rows:
        rest = rng.dirichlet(np.ones(num_experts - 1)) * (1.0 - float(top))
        if rest.max() < float(top) and rest.max() > 1e-3:
            rows.append(np.concatenate([[top], rest.astype(np.float32)]))
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("num_experts", [4, 8, 16, 64])
@pytest.mark.parametrize("threshold", [0.3, 0.4, 0.5, 0.6, 0.7])
def test_top_p_includes_crossing_expert_one_ulp_below(num_experts, threshold):
    # Exactly: the top expert alone is below p, so the next one is the crossing expert and
    # must be selected; the two together pass p (the second holds at least 1e-3), so no
    # third. A float32 `cumsum - p_r` rounded back up to p and left the second one out.
    rows = _one_ulp_below_rows(threshold, num_experts, num_rows=100)
    mask = np.asarray(routing.top_p_mask(jnp.asarray(rows), threshold))
    expected = [{0, int(np.argmax(r[1:])) + 1} for r in rows]
    got = _as_sets(mask)
    bad = [i for i in range(len(rows)) if got[i] != expected[i]]
    assert bad == [], f"{len(bad)} of {len(rows)} rows miss the crossing expert"


EXACT_PREFIX_ROWS = [
    # Dyadic probabilities: every prefix sum is exact in float32, so "reaches p" is exact.
    ([0.25, 0.25, 0.25, 0.25], 0.5, {0, 1}),
    ([0.125, 0.5, 0.25, 0.125], 0.75, {1, 2}),
    ([0.125, 0.5, 0.25, 0.125], 0.5, {1}),
    ([0.0625, 0.25, 0.125, 0.0625, 0.25, 0.0625, 0.125, 0.0625], 0.5, {1, 4}),
    ([0.0625, 0.25, 0.125, 0.0625, 0.25, 0.0625, 0.125, 0.0625], 0.625, {1, 2, 4}),
    ([0.0625, 0.25, 0.125, 0.0625, 0.25, 0.0625, 0.125, 0.0625], 0.875, {0, 1, 2, 3, 4, 6}),
]


@pytest.mark.parametrize("probs, threshold, expected", EXACT_PREFIX_ROWS)
def test_top_p_stops_where_a_prefix_equals_p_exactly(probs, threshold, expected):
    got = _as_sets(routing.top_p_mask(jnp.asarray([probs], jnp.float32), threshold))[0]
    assert got == expected
    assert set(ref.top_p_set(np.asarray(probs), threshold)) == expected


def test_top_k_ties_go_to_lower_index():
    probs = jnp.asarray([[0.2, 0.3, 0.3, 0.2]])
    assert _as_sets(routing.top_k_mask(probs, 1)) == [{1}]
    assert _as_sets(routing.top_k_mask(probs, 3)) == [{0, 1, 2}]


def test_rank_is_descending_order():
    order, rank = routing.descending_order(jnp.asarray([[0.1, 0.4, 0.1, 0.4]]))
    assert order.tolist() == [[1, 3, 0, 2]]
    assert rank.tolist() == [[2, 0, 3, 1]]


def test_combine_weights_raw_for_top_p_and_renormalised_for_top_k():
    probs = jnp.asarray([[0.5, 0.3, 0.15, 0.05]])
    top_p = routing.route(probs, "top_p", threshold=0.7)
    np.testing.assert_allclose(top_p.weights, [[0.5, 0.3, 0.0, 0.0]], rtol=1e-6)
    top_k = routing.route(probs, "top_k", top_k=2)
    np.testing.assert_allclose(top_k.weights, [[0.625, 0.375, 0.0, 0.0]], rtol=1e-6)
    switched = routing.route(probs, "top_p", threshold=0.7, renormalize=True)
    np.testing.assert_allclose(switched.weights, [[0.625, 0.375, 0.0, 0.0]], rtol=1e-6)
    switched = routing.route(probs, "top_k", top_k=2, renormalize=False)
    np.testing.assert_allclose(switched.weights, [[0.5, 0.3, 0.0, 0.0]], rtol=1e-6)


def test_works_under_vmap_jit_and_grad():
    logits = jax.random.normal(jax.random.key(0), (5, 7, 6))
    batched = jax.vmap(lambda z: routing.top_p_mask(jax.nn.softmax(z), 0.4))(logits)
    direct = routing.top_p_mask(jax.nn.softmax(logits), 0.4)
    np.testing.assert_array_equal(batched, direct)

    def weighted_sum(z):
        p = jax.nn.softmax(z)
        return jnp.sum(
            routing.route(p, "top_p", threshold=0.4).weights * jnp.arange(6.0)[None, None]
        )

    g = jax.jit(jax.grad(weighted_sum))(logits)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


# Two tokens, three experts: every number below is worked out by hand.
HAND_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])


@pytest.mark.parametrize(
    "threshold, expected",
    [
        # sets {0}, {1}: f = [.5, .5, 0], Q = [.4, .4, .2] -> 3 * (.2 + .2) = 1.2
        (0.4, 1.2),
        # sets {0, 1}, {1, 2}: f = [.5, 1, .5] -> 3 * (.2 + .4 + .1) = 2.1
        (0.8, 2.1),
    ],
)
def test_load_balance_loss_hand_worked(threshold, expected):
    probs = jnp.asarray(HAND_PROBS, jnp.float32)
    mask = routing.top_p_mask(probs, threshold)
    assert float(routing.load_balance_loss(probs, mask)) == pytest.approx(expected, rel=1e-6)


def test_dynamic_loss_is_mean_router_entropy():
    # -(.7 ln .7 + .2 ln .2 + .1 ln .1) = 0.801819; -(.1 ln .1 + .6 ln .6 + .3 ln .3) = 0.897946
    logits = jnp.log(jnp.asarray(HAND_PROBS, jnp.float32))
    assert float(routing.dynamic_loss(logits)) == pytest.approx(0.8498826, rel=1e-5)
    uniform = jnp.zeros((3, 16))
    assert float(routing.dynamic_loss(uniform)) == pytest.approx(math.log(16), rel=1e-6)


def test_z_loss_hand_worked():
    # logsumexp(log p + c) = c for a normalised p: rows give 1 and 2 -> (1 + 4) / 2
    logits = jnp.log(jnp.asarray(HAND_PROBS, jnp.float32)) + jnp.asarray([[1.0], [2.0]])
    assert float(routing.z_loss(logits)) == pytest.approx(2.5, rel=1e-5)


def test_load_balance_gradient_flows_through_q_only():
    logits = jax.random.normal(jax.random.key(3), (64, 8))

    def loss(z):
        p = jax.nn.softmax(z)
        return routing.load_balance_loss(p, routing.top_p_mask(p, 0.4))

    p = jax.nn.softmax(logits)
    f = np.asarray(routing.top_p_mask(p, 0.4), np.float64).mean(0)
    # d/dz of N * sum_i f_i mean_s p_si, with f held fixed, is the softmax Jacobian applied to
    # N f_i / S; compare against that closed form.
    p64 = np.asarray(p, np.float64)
    g_p = 8 * f / 64
    expected = p64 * (g_p - (p64 * g_p).sum(-1, keepdims=True))
    np.testing.assert_allclose(jax.grad(loss)(logits), expected, rtol=1e-4, atol=1e-7)


def test_router_math_stays_float32_for_bf16_logits():
    logits = jax.random.normal(jax.random.key(1), (4, 8)).astype(jnp.bfloat16)
    for fn in (routing.dynamic_loss, routing.z_loss):
        assert fn(logits).dtype == jnp.float32


# ----------------------------------------------------------------------------- biased order


def _probs(rows: int, experts: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(rows, experts)) * 1.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _near_threshold_biased(p, bias, threshold, tol=1e-5) -> bool:
    order = ref.biased_order(p, bias)
    prefix = np.cumsum(np.asarray(p, np.float64)[order])[:-1]
    return bool(np.any(np.abs(prefix - threshold) < tol))


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_biased_top_p_walks_the_biased_order_summing_unbiased_mass(threshold):
    probs = _probs(2000, 8, seed=int(threshold * 10))
    bias = np.random.default_rng(1).normal(size=8).astype(np.float32)
    r = routing.route(jnp.asarray(probs), "top_p", threshold=threshold, bias=jnp.asarray(bias))
    mask, weights = np.asarray(r.mask), np.asarray(r.weights)
    compared = 0
    for row, p in enumerate(probs):
        if _near_threshold_biased(p, bias, threshold):
            continue
        assert set(np.flatnonzero(mask[row])) == set(ref.top_p_set_biased(p, threshold, bias))
        compared += 1
    assert compared > 1900
    np.testing.assert_array_equal(weights, np.where(mask, probs, 0.0))  # unbiased weights
    # The bias changes what is selected: the plain rule picks differently on many rows.
    plain = np.asarray(routing.top_p_mask(jnp.asarray(probs), threshold))
    assert np.mean(np.any(plain != mask, axis=-1)) > 0.1


def test_biased_top_k_and_a_hand_worked_row():
    probs = _probs(500, 8, seed=3)
    bias = np.random.default_rng(4).normal(size=8).astype(np.float32)
    r = routing.route(jnp.asarray(probs), "top_k", top_k=2, bias=jnp.asarray(bias))
    got = [set(np.flatnonzero(m)) for m in np.asarray(r.mask)]
    assert got == [set(ref.top_k_set_biased(p, 2, bias)) for p in probs]
    total = np.asarray(r.weights).sum(-1)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)  # top-k renormalises the unbiased mass
    # p = [0.5, 0.3, 0.2]; bias lifts expert 2 first: order 2, 0, 1. Top-p 0.6 sums 0.2 then
    # 0.5 (0.7 >= 0.6): experts {2, 0}; the combine weights stay 0.2 and 0.5.
    row = routing.route(jnp.asarray([[0.5, 0.3, 0.2]]), "top_p", threshold=0.6,
                        bias=jnp.asarray([0.0, 0.0, 1.0]))  # fmt: skip
    assert np.asarray(row.mask).tolist() == [[True, False, True]]
    np.testing.assert_allclose(np.asarray(row.weights), [[0.5, 0.0, 0.2]], rtol=1e-6)
