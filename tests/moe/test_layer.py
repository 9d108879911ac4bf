"""MoELayer in every dispatch mode against a per-token, per-expert float64 loop reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import MoEConfig, MoELayer
from tests import reference as ref

E, D, F = 8, 16, 32


def _layer(**kw) -> MoELayer:
    kw = {"num_experts": E, "d_model": D, "d_ff": F, **kw}
    return MoELayer(MoEConfig(**kw), rngs=nnx.Rngs(0))


def _params(layer: MoELayer) -> dict:
    return {
        "router": np.asarray(layer.router_DE[...]),
        "gate": np.asarray(layer.w_gate_EDF[...]),
        "up": np.asarray(layer.w_up_EDF[...]),
        "down": np.asarray(layer.w_down_EFD[...]),
    }


def _x(shape=(4, 16, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


ROUTERS = [
    {"router": "top_p", "threshold": 0.4},
    {"router": "top_p", "threshold": 0.8, "max_k": 3},
    {"router": "top_k", "top_k": 1},
    {"router": "top_k", "top_k": 2},
]


def _reference(layer, x, group_size, capacity_factor):
    cfg = layer.config
    cap = ref.capacity(capacity_factor, group_size, cfg.capacity_k, cfg.num_experts)
    return ref.moe_loop(
        np.asarray(x),
        _params(layer),
        router=cfg.router.value,
        threshold=cfg.threshold,
        top_k=cfg.top_k,
        max_k=cfg.max_k,
        group_size=group_size,
        capacity=cap,
    )


@pytest.mark.parametrize("dispatch", ["einsum", "index"])
@pytest.mark.parametrize("router_kw", ROUTERS)
def test_no_drops_equals_loop_reference(router_kw, dispatch):
    layer = _layer(capacity_factor=None, group_size=32, dispatch=dispatch, **router_kw)
    x = _x()
    y, aux = nnx.jit(lambda m, v: m(v))(layer, x)
    y_ref, selections, dropped = _reference(layer, x, 32, None)
    assert dropped == 0 and float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert float(aux["experts_per_token"]) == pytest.approx(selections / 64, rel=1e-6)


@pytest.mark.parametrize("router_kw", ROUTERS)
def test_drops_follow_priority_and_modes_agree(router_kw):
    outs = {}
    for dispatch in ("einsum", "index"):
        layer = _layer(capacity_factor=0.5, group_size=16, dispatch=dispatch, **router_kw)
        outs[dispatch] = layer(_x(seed=2))
    y_ref, selections, dropped = _reference(layer, _x(seed=2), 16, 0.5)
    assert dropped > 0
    for y, aux in outs.values():
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        assert float(aux["dropped_fraction"]) == pytest.approx(dropped / selections, abs=1e-6)
    np.testing.assert_allclose(outs["einsum"][0], outs["index"][0], rtol=1e-6, atol=1e-6)


def _loss_and_grads(layer, x):
    w = jax.random.normal(jax.random.key(9), x.shape)

    def loss(m):
        y, _ = m(x)
        return jnp.sum(y * w), y

    (_, y), g = nnx.value_and_grad(loss, has_aux=True)(layer)
    return y, g


PARAMS = ("router_DE", "w_gate_EDF", "w_up_EDF", "w_down_EFD")


@pytest.mark.parametrize("router_kw", ROUTERS)
def test_grouped_without_budget_equals_index_and_loop_reference(router_kw):
    x = _x(seed=3)
    kw = {"capacity_factor": None, "group_size": 16, **router_kw}
    grouped = _layer(dispatch="grouped", block_size=4, **kw)
    y, aux = nnx.jit(lambda m, v: m(v))(grouped, x)
    y_ref, selections, _ = _reference(grouped, x, 16, None)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0
    assert float(aux["experts_per_token"]) == pytest.approx(selections / 64, rel=1e-6)
    # Rows computed, block padding included: at least the selections, at most 3 more per expert.
    slots = round(float(aux["slots_per_token"]) * 64)
    assert selections <= slots <= selections + E * 3 and slots % 4 == 0
    y_g, g_grouped = _loss_and_grads(grouped, x)
    y_i, g_index = _loss_and_grads(_layer(dispatch="index", **kw), x)
    np.testing.assert_allclose(y_g, y_i, rtol=1e-5, atol=1e-6)
    for name in PARAMS:
        got, want = getattr(g_grouped, name)[...], getattr(g_index, name)[...]
        # top-1 renormalised: every weight is p / p = 1, so the router's gradient is exactly 0
        # and both modes return rounding noise of sum(dy * y) terms (up to ~1e-6).
        atol = 5e-6 if name == "router_DE" and router_kw.get("top_k") == 1 else 1e-6
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.parametrize("router_kw", ROUTERS)
def test_grouped_budget_drops_lowest_priority_like_loop_reference(router_kw):
    x = _x(seed=2)
    layer = _layer(dispatch="grouped", capacity_factor=0.6, group_size=16, block_size=2,
                   **router_kw)  # fmt: skip
    y, aux = layer(x)
    cfg = layer.config
    b = ref.budget(0.6, 16, cfg.capacity_k, cfg.max_selections)
    assert b == cfg.budget(16)
    y_ref, selections, dropped = ref.moe_loop(
        np.asarray(x), _params(layer), router=cfg.router.value, threshold=cfg.threshold,
        top_k=cfg.top_k, max_k=cfg.max_k, group_size=16, capacity=None, budget=b,
    )  # fmt: skip
    assert dropped > 0
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == pytest.approx(dropped / selections, abs=1e-6)


def test_grouped_weight_order_keeps_the_largest_weights():
    x = _x(seed=4)
    kw = {"dispatch": "grouped", "group_size": 16, "threshold": 0.8, "block_size": 2}
    by_rank = _layer(capacity_factor=0.5, drop_order="rank", **kw)
    by_weight = _layer(capacity_factor=0.5, drop_order="weight", **kw)
    full = _layer(capacity_factor=None, **kw)
    (y_r, aux_r), (y_w, aux_w), (y_f, _) = by_rank(x), by_weight(x), full(x)
    assert float(aux_r["dropped_fraction"]) == float(aux_w["dropped_fraction"]) > 0
    # As many kept, but the largest weights: less of the output is lost.
    lost_rank = float(jnp.sum(jnp.abs(y_f - y_r)))
    lost_weight = float(jnp.sum(jnp.abs(y_f - y_w)))
    assert lost_weight < lost_rank


def test_group_defaults_to_one_sequence():
    layer = _layer(capacity_factor=1.0, expected_k=1.5, dispatch="index")
    y_ref, selections, dropped = _reference(layer, _x(), 16, 1.0)
    y, aux = layer(_x())
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == pytest.approx(dropped / selections, abs=1e-6)
    # ceil(1.0 * 16 * 1.5 / 8) = 3 slots per expert -> 8 * 3 / 16 slots per token
    assert float(aux["slots_per_token"]) == pytest.approx(1.5)


def test_metrics_are_consistent():
    layer = _layer(capacity_factor=None, threshold=0.6)
    _, aux = layer(_x())
    load = np.asarray(aux["expert_load"])
    assert load.shape == (E,) and load.sum() == pytest.approx(1.0, rel=1e-6)
    assert 1.0 <= float(aux["experts_per_token_min"]) <= float(aux["experts_per_token"])
    assert float(aux["experts_per_token"]) <= float(aux["experts_per_token_max"]) <= E
    for name in ("load_balance_loss", "dynamic_loss", "z_loss"):
        assert aux[name].shape == () and aux[name].dtype == jnp.float32


def test_traced_once_for_new_inputs_of_same_shape():
    layer = _layer()
    traces = []

    @nnx.jit
    def forward(m, v):
        traces.append(1)
        return m(v)

    for seed in range(3):
        forward(layer, _x(seed=seed))
    assert len(traces) == 1


def _grads(layer, loss_fn):
    def loss(m):
        y, aux = m(_x((4, 32, D), seed=5))
        return loss_fn(y, aux)

    return nnx.grad(loss)(layer)


def test_gradients_reach_router_and_every_expert():
    layer = _layer(threshold=0.6, capacity_factor=None)
    w = jax.random.normal(jax.random.key(9), (4, 32, D))
    g = _grads(layer, lambda y, aux: jnp.sum(y * w))
    assert float(jnp.abs(g.router_DE[...]).sum()) > 0  # through the combine weights
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        per_expert = jnp.abs(getattr(g, name)[...]).reshape(E, -1).sum(-1)
        assert bool(jnp.all(per_expert > 0)), name


def test_aux_losses_train_the_router_only():
    layer = _layer()
    g = _grads(layer, lambda y, aux: aux["load_balance_loss"] + aux["dynamic_loss"])
    assert float(jnp.abs(g.router_DE[...]).sum()) > 0
    assert float(jnp.abs(g.w_up_EDF[...]).sum()) == 0.0


def test_bf16_activations_keep_float32_router():
    layer = _layer(dtype=jnp.bfloat16, capacity_factor=None)
    y, aux = layer(_x().astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert aux["dynamic_loss"].dtype == jnp.float32
    assert layer.router_logits(_x().astype(jnp.bfloat16)).dtype == jnp.float32


def test_group_size_must_divide_tokens():
    message = r"moe.group_size=24 is invalid: allowed a divisor of .* = 4 \* 16\)"
    with pytest.raises(ValueError, match=message):
        _layer(group_size=24)(_x())


@pytest.mark.parametrize("shape", [(4, 16, 12), (64, 16)])
def test_input_of_another_width_is_one_line_naming_d_model(shape):
    layer = _layer()
    expected = f"MoELayer takes x of shape [batch, seq, d_model=16]; got shape {shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        layer(_x(shape))
    # Under jit too, at trace time (JAX appends a note on its filtered traceback frames).
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        nnx.jit(lambda m, x: m(x))(layer, _x(shape))


def test_a_padding_mask_of_another_shape_is_one_line():
    with pytest.raises(ValueError, match=r"valid_BT of shape \[batch, seq\] = \(4, 16\); got "):
        _layer()(_x(), jnp.ones((4, 8), bool))


def _dense_mixture_ref(layer: MoELayer, x_BTD) -> np.ndarray:
    """sum_i p_i E_i(x) over every expert, one expert at a time, in float64."""
    p = _params(layer)
    x = np.asarray(x_BTD, np.float64)
    logits = x @ p["router"].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    y = np.zeros_like(x)
    for e in range(E):
        w = [p[name][e].astype(np.float64) for name in ("gate", "up", "down")]
        y += probs[..., e : e + 1] * ref.swiglu(x, *w)
    return y


@pytest.mark.parametrize("dispatch", ["index", "einsum", "grouped"])
def test_top_p_at_threshold_one_with_raw_weights_is_the_dense_mixture(dispatch):
    layer = _layer(router="top_p", threshold=1.0, renormalize=False, capacity_factor=None,
                   dispatch=dispatch, block_size=4)  # fmt: skip
    x = _x(seed=6)
    y, aux = nnx.jit(lambda m, v: m(v))(layer, x)
    assert float(aux["experts_per_token_min"]) == E and float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y, _dense_mixture_ref(layer, x), rtol=1e-5, atol=1e-5)


def test_padding_routes_nowhere_and_leaves_the_aux_losses():
    layer = _layer(capacity_factor=None, threshold=0.6)
    x = _x((2, 16, D), seed=3)
    valid = np.ones((2, 16), bool)
    valid[1, 10:] = False  # the second row's last 6 positions are padding
    y, aux = nnx.jit(lambda m, v, ok: m(v, ok))(layer, x, jnp.asarray(valid))
    y_all, _ = nnx.jit(lambda m, v: m(v))(layer, x)
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_all)[valid], rtol=1e-6)
    assert not np.any(np.asarray(y)[~valid]) and not np.any(
        np.asarray(aux["token_experts"])[~valid]
    )
    # The losses over the 26 valid tokens alone, float64.
    x_MD = np.asarray(x, np.float64)[valid]
    logits = x_MD @ np.asarray(layer.router_DE[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mask = np.zeros_like(probs)
    for m, p in enumerate(probs):
        mask[m, ref.top_p_set(p, 0.6)] = 1
    want_lb = E * np.sum(mask.mean(0) * probs.mean(0))
    want_entropy = -np.mean(np.sum(probs * np.log(probs), -1))
    assert float(aux["load_balance_loss"]) == pytest.approx(want_lb, rel=1e-5)
    assert float(aux["dynamic_loss"]) == pytest.approx(want_entropy, rel=1e-5)
    assert float(aux["experts_per_token"]) == pytest.approx(mask.sum(1).mean(), rel=1e-6)
    assert float(aux["experts_per_token_min"]) == mask.sum(1).min()
    assert float(aux["dropped_fraction"]) == 0.0


# The grouped layer on every backend of its grouped matmul: the CPU's fused loop,
# jax.lax.ragged_dot and tokamax (its "xla" implementation on CPU).


def _backend_layer(backend: str) -> MoELayer:
    # A budget that binds (capacity_factor 0.6) and blocks of 4: the buffer has block padding
    # inside the groups, rows past them, and experts without rows in some groups.
    cfg = MoEConfig(num_experts=8, d_model=16, d_ff=32, router="top_p", threshold=0.6,
                    capacity_factor=0.6, group_size=16, dispatch="grouped", block_size=4,
                    matmul_backend=backend)  # fmt: skip
    return MoELayer(cfg, rngs=nnx.Rngs(0))


def _backend_output_and_grads(backend: str):
    layer = _backend_layer(backend)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16))
    ct = jax.random.normal(jax.random.key(2), (2, 16, 16))

    def loss(m):
        y, aux = m(x)
        return jnp.sum(y * ct), (y, aux["dropped_fraction"])

    (_, (y, dropped)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer)
    assert float(dropped) > 0  # the budget binds
    return y, nnx.to_pure_dict(nnx.state(grads))


@pytest.mark.parametrize("backend", ["ragged_dot", "tokamax"])
def test_layer_matches_the_cpu_loop_on_each_backend(backend):
    if backend == "tokamax":
        pytest.importorskip("tokamax")
    y, grads = _backend_output_and_grads(backend)
    y_cpu, grads_cpu = _backend_output_and_grads("blocks")
    np.testing.assert_allclose(y, y_cpu, rtol=1e-5, atol=1e-6)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = dict(jax.tree_util.tree_leaves_with_path(grads_cpu))[path]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_the_layer_takes_one_config_object():
    with pytest.raises(TypeError, match=r"MoELayer takes a MoEConfig; got dict"):
        MoELayer({"d_model": 8}, rngs=nnx.Rngs(0))
