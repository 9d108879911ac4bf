"""Routing that keeps its budget: the threshold controller and the bias rule, hand-worked and
in closed loop (the biased selection is in test_routing.py, a train step in
tests/train/test_step.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.moe import balance


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
