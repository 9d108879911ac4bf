"""The decode path (few tokens: only the experts some token selected) against the grouped and
index modes and a float64 per-expert loop; the rule that picks it; the per-expert layout; and
the path under a 2 x 4 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dynmoe_jax import MoEConfig, MoELayer, sharding
from dynmoe_jax.moe import decode as decode_experts
from dynmoe_jax.moe import experts
from tests import reference as ref

E, D, F = 8, 16, 32
ROUTERS = [
    {"router": "top_p", "threshold": 0.4},
    {"router": "top_p", "threshold": 0.9, "max_k": 3},
    {"router": "top_k", "top_k": 1},
    {"router": "top_k", "top_k": 2},
    {"router": "top_p", "threshold": 1.0},  # every expert: the path's plain sum over all
]


def _layer(**kw) -> MoELayer:
    kw = {"num_experts": E, "d_model": D, "d_ff": F, "capacity_factor": None, **kw}
    return MoELayer(rngs=nnx.Rngs(0), **kw)


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _forward(layer, x):
    return nnx.jit(lambda m, v: m(v))(layer, x)


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


@pytest.mark.parametrize("router_kw", ROUTERS[:3] + ROUTERS[-1:])
def test_per_expert_layout_gives_the_same_outputs_in_every_mode(router_kw):
    for dispatch, shape in [("grouped", (1, 1, D)), ("grouped", (2, 40, D)), ("index", (2, 9, D))]:
        layer = _layer(dispatch=dispatch, block_size=4, **router_kw)
        x = _x(shape)
        y_stacked, _ = _forward(layer, x)
        layer.split_experts()
        assert experts.is_split(layer.w_gate_EDF.get_value())
        assert len(layer.w_down_EFD.get_value()) == E
        assert layer.w_down_EFD.get_value()[0].shape == (D, F)  # the down weight transposed
        y_split, _ = _forward(layer, x)
        np.testing.assert_allclose(y_split, y_stacked, rtol=1e-6, atol=1e-6, err_msg=dispatch)


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
    layer = _layer(dtype=jnp.bfloat16)
    layer.split_experts()
    assert layer.w_up_EDF.get_value()[0].dtype == jnp.bfloat16  # stored in the compute dtype
    y_split, _ = _forward(layer, x.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(y_split, np.float32), np.asarray(y16, np.float32))


# ----------------------------------------------------------------------------- the rule


def test_automatic_token_limit_hand_worked():
    # E=8, k=2, blocks of 32: N=42 gives u=8: 42*8=336 <= 84+256; N=43: 344 > 86+256.
    cfg = MoEConfig(num_experts=8, d_model=4, d_ff=4)
    assert cfg.auto_decode_tokens == 42
    # E=64, k=8: N=36: 36*64=2304 <= 288+2048; N=37: 2368 > 296+2048.
    assert (
        MoEConfig(num_experts=64, d_model=4, d_ff=4, router="top_k", top_k=8).auto_decode_tokens
        == 36
    )
    # Every N up to the block size passes, whatever k and E.
    assert (
        MoEConfig(
            num_experts=4, d_model=4, d_ff=4, expected_k=1.0, block_size=16
        ).auto_decode_tokens
        >= 16
    )


def test_path_needs_few_tokens_and_no_possible_drop():
    base = {"num_experts": 8, "d_model": 4, "d_ff": 4}
    free = MoEConfig(capacity_factor=None, **base)
    assert free.takes_decode_path(1, 1) and free.takes_decode_path(42, 42)
    assert not free.takes_decode_path(43, 43)
    # A grouped budget of ceil(1.25 * 2 * 1) = 3 < 4 selections a top-p token may make.
    assert not MoEConfig(capacity_factor=1.25, **base).takes_decode_path(1, 1)
    # Index capacity of one token per group is that token: nothing can drop.
    assert MoEConfig(capacity_factor=1.25, dispatch="index", **base).takes_decode_path(1, 1)
    assert not MoEConfig(capacity_factor=None, decode_tokens=0, **base).takes_decode_path(1, 1)
    assert MoEConfig(capacity_factor=None, decode_tokens=500, **base).takes_decode_path(500, 250)


@pytest.mark.parametrize("value", [-1, 2.5, "8", True])
def test_bad_decode_tokens_is_one_line(value):
    with pytest.raises(ValueError) as err:
        MoEConfig(num_experts=8, d_model=4, d_ff=4, decode_tokens=value)
    assert str(err.value) == (f"moe.decode_tokens={value!r} is invalid: allowed None (by the "
                              "rule) or an integer >= 0 (0 = never)")  # fmt: skip


def test_loop_runs_no_expert_past_the_selected():
    x_ND = _x((2, D))
    mask_NE = jnp.zeros((2, E), bool).at[0, 3].set(True).at[1, 3].set(True)
    weights_NE = jnp.where(mask_NE, 0.5, 0.0)
    nan_weights = tuple(jnp.full(s, jnp.nan) for s in ((E, D, F), (E, D, F), (E, F, D)))
    nan_weights = tuple(w.at[3].set(1.0) for w in nan_weights)  # only expert 3 is finite
    y_ND, used = decode_experts.selected_experts(x_ND, mask_NE, weights_NE, nan_weights, 4)
    assert int(used) == 1 and bool(jnp.all(jnp.isfinite(y_ND)))
    want = 0.5 * experts.swiglu(x_ND, *(w[3] for w in nan_weights))
    np.testing.assert_allclose(y_ND, want, rtol=1e-6)


# ----------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("router_kw", [ROUTERS[0], ROUTERS[3]])
def test_decode_path_under_a_2x4_mesh_matches_one_device(router_kw):
    x = _x((8, 1, D))
    want, aux_1 = _forward(_layer(dispatch="grouped", decode_tokens=0, **router_kw), x)
    layer = _layer(**router_kw)
    mesh = sharding.make_mesh("data=2,expert=4")
    graphdef, params = nnx.split(layer)
    spec = lambda p: sharding.logical_to_spec(p.get_metadata()["logical_axes"])  # noqa: E731
    with jax.set_mesh(mesh):
        params = jax.tree.map(lambda p: p.replace(jax.device_put(p.get_value(), NamedSharding(
            mesh, spec(p)))), params, is_leaf=lambda p: isinstance(p, nnx.Variable))  # fmt: skip
        assert params["w_gate_EDF"].get_value().sharding.spec[0] == "expert"
        fn = jax.jit(lambda p, v: nnx.merge(graphdef, p)(v))
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "expert"))))
        y, aux = fn(params, xs)
        hlo = fn.lower(params, xs).compile().as_text()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["experts_per_token"], aux_1["experts_per_token"], rtol=1e-6)
    assert "all-reduce" in hlo  # each device's experts summed over `expert`
