"""The decode path (few tokens: only the experts some token selected) against the grouped and
index modes and a float64 per-expert loop, its gradients, bfloat16, and the loop that runs
only the selected experts."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax.moe import decode as decode_experts
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
    {"router": "top_k", "top_k": 2},
    {"router": "top_p", "threshold": 1.0},  # every expert: the path's plain sum over all
]


def _reference(layer, x):
    cfg = layer.config
    params = {"router": layer.router_DE[...]}
    stacked = experts.stacked_weights(layer.expert_weights())
    params.update(zip(("gate", "up", "down"), stacked, strict=True))
    y, _, _ = ref.moe_loop(np.asarray(x), {k: np.asarray(v) for k, v in params.items()},
                           router=cfg.router.value, threshold=cfg.threshold, top_k=cfg.top_k,
                           max_k=cfg.max_k, group_size=x.shape[1], capacity=None,
                           )  # fmt: skip
    return y


@pytest.mark.parametrize("router_kw", ROUTERS)
@pytest.mark.parametrize("shape", [(1, 1, D), (8, 1, D), (2, 5, D)])
def test_decode_path_equals_grouped_index_and_loop_reference(router_kw, shape):
    x = _x(shape)
    y, aux = _forward(_layer(**router_kw), x)
    assert float(aux["slots_per_token"]) <= E  # experts computed, each on every token
    if router_kw.get("threshold") == 1.0:
        assert float(aux["slots_per_token"]) == E
    for dispatch in ("grouped", "index"):
        y_mode, aux_mode = _forward(_layer(dispatch=dispatch, decode_tokens=0, **router_kw), x)
        np.testing.assert_allclose(y, y_mode, rtol=1e-5, atol=1e-6, err_msg=dispatch)
        for name in ("experts_per_token", "load_balance_loss", "dropped_fraction"):
            np.testing.assert_allclose(aux[name], aux_mode[name], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(y, _reference(_layer(**router_kw), x), rtol=1e-5, atol=1e-6)


def test_decode_path_computes_only_the_selected_experts():
    layer = _layer(router="top_k", top_k=1)
    x = _x((3, 1, D))
    _, aux = _forward(layer, x)
    used = np.unique(np.argmax(np.asarray(x).reshape(3, D) @ np.asarray(layer.router_DE[...]), 1))
    assert float(aux["slots_per_token"]) == len(used) < E


def test_decode_path_gradients_equal_the_index_mode():
    x = _x((2, 3, D))

    def grads(layer):
        def loss(m):
            y, aux = m(x)
            return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"]

        return nnx.grad(loss)(layer)

    got, want = grads(_layer()), grads(_layer(dispatch="index", decode_tokens=0))
    for name in ("router_DE", *experts.NAMES):
        np.testing.assert_allclose(getattr(got, name)[...], getattr(want, name)[...],
                                   rtol=1e-5, atol=1e-6, err_msg=name)  # fmt: skip


def test_bfloat16_decode_path_tracks_float32():
    x = _x((4, 1, D))
    y32, _ = _forward(_layer(), x)
    y16, aux = _forward(_layer(dtype=jnp.bfloat16), x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.02)
    for kernel in (False, True):
        layer = _layer(dtype=jnp.bfloat16, decode_kernel=kernel)
        layer.split_experts()
        assert layer.w_up_EDF.get_value()[0].dtype == jnp.bfloat16  # stored in the compute dtype
        y_split = np.asarray(_forward(layer, x.astype(jnp.bfloat16))[0], np.float32)
        if kernel:  # float32 between the products as well: as close to float32 or closer
            np.testing.assert_allclose(y_split, y32, rtol=0.05, atol=0.02)
        else:  # XLA's forms, per expert: the stacked layout's numbers
            np.testing.assert_array_equal(y_split, np.asarray(y16, np.float32))


def test_loop_runs_no_expert_past_the_selected():
    x_MD = _x((2, D))
    mask_ME = jnp.zeros((2, E), bool).at[0, 3].set(True).at[1, 3].set(True)
    weights_ME = jnp.where(mask_ME, 0.5, 0.0)
    nan_weights = tuple(jnp.full(s, jnp.nan) for s in ((E, D, F), (E, D, F), (E, F, D)))
    nan_weights = tuple(w.at[3].set(1.0) for w in nan_weights)  # only expert 3 is finite
    y_MD, used = decode_experts.selected_experts(x_MD, mask_ME, weights_ME, nan_weights, 4)
    assert int(used) == 1 and bool(jnp.all(jnp.isfinite(y_MD)))
    want = 0.5 * experts.swiglu(x_MD, *(w[3] for w in nan_weights))
    np.testing.assert_allclose(y_MD, want, rtol=1e-6)
