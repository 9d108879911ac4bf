"""The SwiGLU and the two layouts of an MoE layer's expert weights (stacked, per expert)
against float64 references, and the layer's outputs in either layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.moe import experts
from tests import reference as ref
from tests.moe.layers import D, E, F
from tests.moe.layers import forward as _forward
from tests.moe.layers import layer as _layer
from tests.moe.layers import x as _x

ROUTERS = [
    {"router": "top_p", "threshold": 0.4},
    {"router": "top_p", "threshold": 0.9, "max_k": 3},
    {"router": "top_k", "top_k": 1},
    {"router": "top_p", "threshold": 1.0},  # every expert
]


@pytest.mark.parametrize("router_kw", ROUTERS)
def test_per_expert_layout_gives_the_same_outputs_in_every_mode(router_kw):
    for dispatch, shape in [("grouped", (1, 1, D)), ("grouped", (2, 40, D)), ("index", (2, 9, D))]:
        layer = _layer(dispatch=dispatch, block_size=4, **router_kw)
        x = _x(shape)
        y_stacked, _ = _forward(layer, x)
        layer.split_experts()
        assert experts.is_split(layer.w_gate_EDF.get_value())
        assert len(layer.w_down_EFD.get_value()) == E
        # Every weight stored [out, in] per expert.
        assert layer.w_gate_EDF.get_value()[0].shape == (F, D)
        assert layer.w_down_EFD.get_value()[0].shape == (D, F)
        y_split, _ = _forward(layer, x)
        np.testing.assert_allclose(y_split, y_stacked, rtol=1e-6, atol=1e-6, err_msg=dispatch)


def _stacked_weights(seed=2):
    k_gate, k_up, k_down = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k_gate, (E, D, F)),
        jax.random.normal(k_up, (E, D, F)),
        jax.random.normal(k_down, (E, F, D)) / 4,
    )


def test_swiglu_of_every_expert_matches_float64_in_both_layouts():
    x_EAD = jax.random.normal(jax.random.key(1), (E, 5, D))
    stacked = _stacked_weights()
    w64 = [np.asarray(w, np.float64) for w in stacked]
    x64 = np.asarray(x_EAD, np.float64)
    want_EAD = np.stack([ref.swiglu(x64[e], w64[0][e], w64[1][e], w64[2][e]) for e in range(E)])
    split = experts.split_weights(stacked)
    for weights in (stacked, split):
        np.testing.assert_allclose(experts.per_expert_swiglu(x_EAD, weights), want_EAD,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    for e in (0, 5):
        one = experts.swiglu(x_EAD[e], stacked[0][e], stacked[1][e], stacked[2][e])
        np.testing.assert_allclose(one, want_EAD[e], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(experts.expert_swiglu(x_EAD[e], split, e), want_EAD[e],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_split_and_stacked_layouts_round_trip_exactly():
    stacked = _stacked_weights()
    split = experts.split_weights(stacked)
    assert experts.is_split(split[0]) and not experts.is_split(stacked[0])
    assert experts.num_experts(split[2]) == experts.num_experts(stacked[2]) == E
    # Each weight stored [out, in] per expert; expert_shape gives [in, out] in both layouts.
    for w_split, w_stacked in zip(split, stacked, strict=True):
        assert experts.expert_shape(w_split) == experts.expert_shape(w_stacked)
        np.testing.assert_array_equal(w_split[3], np.asarray(w_stacked[3]).T)
    assert split[0][0].shape == (F, D) and split[2][0].shape == (D, F)
    for back, want in zip(experts.stacked_weights(split), stacked, strict=True):
        np.testing.assert_array_equal(back, want)
    assert experts.split_weights(split) is split  # already per expert: nothing to do
    half = experts.split_weights(stacked, jnp.bfloat16)
    assert {a.dtype for w in half for a in w} == {jnp.dtype(jnp.bfloat16)}
    want = np.asarray(stacked[1][6].T.astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(half[1][6], np.float32), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16), (2, 16), (8, 16), (3, 5, 16), (40, 16)])
def test_times_out_in_equals_a_float64_product_in_each_form(shape, dtype):
    # Rows pick the form (matrix-vector, multiply-reduce, matmul): each against float64.
    k_x, k_w = jax.random.split(jax.random.key(5))
    x_AX = jax.random.normal(k_x, shape).astype(dtype)
    w_YX = jax.random.normal(k_w, (24, shape[-1])).astype(dtype)
    want = np.asarray(x_AX, np.float64) @ np.asarray(w_YX, np.float64).T
    got = experts.times_out_in(x_AX, w_YX)
    assert got.dtype == dtype and got.shape == shape[:-1] + (24,)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == jnp.float32 else {"rtol": 2e-2, "atol": 5e-2}
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)
