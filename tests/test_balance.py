"""Routing that keeps its budget: the biased order of selection against a float64 reference,
the controller and the bias rule hand-worked and in closed loop, and both in a training step
(state, not trained; resumed with the checkpoint)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import config as config_lib
from dynmoe_jax import train
from dynmoe_jax.configs import tiny
from dynmoe_jax.moe import balance, routing
from tests import reference as ref


def _probs(rows: int, experts: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(rows, experts)) * 1.5
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _near_threshold(p, bias, threshold, tol=1e-5) -> bool:
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
        if _near_threshold(p, bias, threshold):
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


def test_controller_step_hand_worked():
    # k = 1.2 against a target of 1.5: e = 0.2, I = 0.2; p = sigmoid(logit(0.4) + KP e + KI I).
    p, integral = balance.threshold_step(jnp.float32(0.4), jnp.float32(0.0), jnp.float32(1.2),
                                         1.5, 0.4)  # fmt: skip
    e = 0.2
    want = 1 / (1 + np.exp(-(np.log(0.4 / 0.6) + balance.KP * e + balance.KI * e)))
    assert float(integral) == pytest.approx(e) and float(p) == pytest.approx(want, rel=1e-6)
    big = balance.threshold_step(jnp.float32(0.4), jnp.float32(balance.I_MAX), jnp.float32(1.0),
                                 1.5, 0.4)[1]  # fmt: skip
    assert float(big) == balance.I_MAX  # anti-windup


def test_controller_tracks_a_noisy_monotone_plant():
    # A layer whose mean k rises with p (k = 1 + 2.5 p^2, plus batch noise): the controller
    # settles within 3% of the target and stays there.
    rng = np.random.default_rng(0)
    p, integral, ks = jnp.float32(0.4), jnp.float32(0.0), []
    for _ in range(400):
        k = 1 + 2.5 * float(p) ** 2 + rng.normal(0, 0.05)
        ks.append(k)
        p, integral = balance.threshold_step(p, integral, jnp.float32(k), 1.5, 0.4)
    windows = np.asarray(ks[40:]).reshape(-1, 40).mean(-1)
    assert np.all(np.abs(windows - 1.5) / 1.5 < 0.03), windows


def test_bias_step_moves_busy_experts_down_and_quiet_ones_up():
    load = jnp.asarray([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    got = balance.bias_step(jnp.zeros((2, 4)), load, 0.01)
    np.testing.assert_allclose(got, [[-0.01, 0.0, 0.01, 0.01], [0.0, 0.0, 0.0, 0.0]])


def _run(scan: bool, **moe):
    c = tiny.get_config()
    c.model.scan_layers = scan
    c.loss.load_balance_weight = 0.0
    for k, v in moe.items():
        c.moe[k] = v
    return config_lib.resolve(c)


def _states(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat
            if p[-1].key in balance.FROZEN}  # fmt: skip


@pytest.mark.parametrize("scan", [False, True])
def test_a_train_step_moves_the_state_by_its_rules_and_not_by_the_optimizer(scan):
    run = _run(scan, target_k=1.5, bias_balance=0.01)
    task = train.build_task(run, 64)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 33))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
             "weights": np.ones((8, 32), np.float32)}  # fmt: skip
    with jax.set_mesh(task.mesh):
        state = train.init_state(task)
        before = _states(jax.device_get(state.params))
        after_state, metrics = train.make_train_step(task)(state, train.put_batch(task, batch))
    after = _states(jax.device_get(after_state.params))
    assert len(before) == 6 if not scan else len(before) == 3  # threshold, integral, bias
    k_L = np.asarray(metrics["experts_per_layer"])
    want_p, want_i = balance.threshold_step(jnp.full(2, 0.4), jnp.zeros(2), k_L, 1.5, 0.4)
    thresholds = [v for k, v in after.items() if "router_threshold" in k]
    np.testing.assert_allclose(np.concatenate([np.ravel(t) for t in thresholds]), want_p,
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(metrics["threshold_per_layer"]), [0.4, 0.4])
    biases = np.concatenate([np.ravel(v) for k, v in after.items() if "bias" in k])
    assert np.all(np.isclose(np.abs(biases), 0.01) | (biases == 0))  # one sign step from zero
    assert np.any(biases != 0)


def test_a_target_needs_top_p_and_a_rate_is_not_negative():
    with pytest.raises(ValueError, match=r"^moe.target_k=1.5 is invalid: .*moe.router='top_p'"):
        _run(False, router="top_k", target_k=1.5)
    with pytest.raises(ValueError, match=r"^moe.target_k=9.0 is invalid: allowed None or 1"):
        _run(False, target_k=9.0)
    with pytest.raises(ValueError, match=r"^moe.bias_balance=-0.1 is invalid: allowed a number"):
        _run(False, bias_balance=-0.1)
    run = _run(False, target_k=1.5)
    assert run.moe.capacity_k == 1.5  # the budget is sized on the target
    assert dataclasses.replace(run.moe, expected_k=2.0).capacity_k == 2.0
