"""Expert parallelism on the 8 simulated CPU devices (conftest sets them): the layer under a
mesh in every dispatch mode against one device, the grouped ring's collectives and memory,
and the decode path's experts split over ``expert``."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dynmoe_jax import MoEConfig, MoELayer, sharding, train
from dynmoe_jax.moe import expert_parallel
from tests import reference as ref
from tests.moe.test_decode import ROUTERS, _forward, _layer, _x
from tests.runs import placed
from tests.sharding_steps import task_and_data

D = 16

MESHES = ["data=2,expert=4", "data=1,expert=8", "data=8,expert=1"]


def test_expert_axis_size_of_a_mesh():
    assert expert_parallel.expert_axis_size(sharding.make_mesh("data=2,expert=4")) == 4
    assert expert_parallel.expert_axis_size(sharding.make_mesh("data=8")) == 1
    assert expert_parallel.expert_axis_size(jax.sharding.get_abstract_mesh()) == 1  # no mesh


def test_selected_experts_split_over_the_expert_axis_match_float64():
    # Three tokens select experts {1, 6}, {6} and {2} of 8: over expert=4 (two experts a
    # device) the devices holding 0-1, 2-3 and 6-7 each run theirs, the one holding 4-5 none.
    k_x, k_w, k_gate, k_up, k_down = jax.random.split(jax.random.key(3), 5)
    x_ND = jax.random.normal(k_x, (3, D))
    mask_NE = jnp.zeros((3, 8), bool).at[0, 1].set(True).at[0, 6].set(True)
    mask_NE = mask_NE.at[1, 6].set(True).at[2, 2].set(True)
    weights_NE = jnp.where(mask_NE, jax.random.uniform(k_w, (3, 8)), 0.0)
    weights = (jax.random.normal(k_gate, (8, D, 32)), jax.random.normal(k_up, (8, D, 32)),
               jax.random.normal(k_down, (8, 32, D)))  # fmt: skip
    mesh = sharding.make_mesh("data=2,expert=4")
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *a: expert_parallel.selected_experts(mesh, *a, max_used=2))
        y_ND, used = fn(x_ND, mask_NE, weights_NE, weights)
    x64, w64 = np.asarray(x_ND, np.float64), [np.asarray(w, np.float64) for w in weights]
    want_ND = np.zeros((3, D))
    for n, e in zip(*np.nonzero(np.asarray(mask_NE)), strict=True):
        out = ref.swiglu(x64[n], w64[0][e], w64[1][e], w64[2][e])
        want_ND[n] += float(weights_NE[n, e]) * out
    np.testing.assert_allclose(y_ND, want_ND, rtol=1e-5, atol=1e-5)
    assert int(used) == 3


COLLECTIVES = {"index": ("all-to-all",), "grouped": ("all-gather", "reduce-scatter")}


@pytest.mark.parametrize("dispatch", list(COLLECTIVES))
def test_expert_parallel_step_collectives(data_dir, dispatch):
    task, data = task_and_data("data=2,expert=4", data_dir, **{"moe.dispatch": dispatch})
    state = train.abstract_state(task)
    batch = placed(task, data.train_batch(0))
    with jax.set_mesh(task.mesh):
        hlo = train.make_train_step(task).lower(state, batch).compile().as_text()
    for op in COLLECTIVES[dispatch]:  # index: the all-to-all of GShard; grouped: the ring
        assert hlo.count(op) >= 4, op  # dispatch and combine, forward and backward


def _layer_loss_and_grads(dispatch: str, mesh_shape: str | None):
    kw = {"threshold": 0.6, "capacity_factor": 1.1, "expected_k": 1.5, "block_size": 4}
    cfg = MoEConfig(num_experts=8, d_model=16, d_ff=32, dispatch=dispatch, **kw)
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 16, 16))

    def loss(m, v):
        y, aux = m(v)
        return jnp.sum(jnp.sin(y)), aux["dropped_fraction"]

    fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    if mesh_shape is None:
        return fn(layer, x)
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        return fn(layer, jax.device_put(x, NamedSharding(mesh, sharding.batch_spec())))


@pytest.mark.parametrize("dispatch", ["einsum", "index", "grouped"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_layer_under_mesh_matches_one_device(dispatch, mesh_shape):
    (loss, dropped), grads = _layer_loss_and_grads(dispatch, mesh_shape)
    (loss_1, dropped_1), grads_1 = _layer_loss_and_grads(dispatch, None)
    assert float(dropped) == float(dropped_1) > 0  # the budget (or capacity) is binding
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
    for name in ("router_DE", "w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        got, want = getattr(grads, name)[...], getattr(grads_1, name)[...]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_grouped_no_device_holds_every_token_for_every_expert():
    cfg = MoEConfig(num_experts=8, d_model=16, d_ff=32, dispatch="grouped", block_size=4,
                    group_size=16)  # fmt: skip
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 64, 16))  # 512 tokens
    mesh = sharding.make_mesh("data=2,expert=4")
    graphdef, params = nnx.split(layer)

    def loss(p, v):
        return jnp.sum(nnx.merge(graphdef, p)(v)[0])

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, sharding.batch_spec()))
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()
    sizes = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"f32\[([0-9,]*)\]", hlo)]  # fmt: skip
    every_token_every_expert = 8 * 512 * 16
    # Per device: the 4 expert peers' 16 groups of 16 tokens, a buffer of their budgets plus
    # block padding (16 * 40 + 2 local experts * 3 = 646 -> 648 rows), F = 32 wide at most.
    assert max(sizes) <= 648 * 32 < every_token_every_expert / 3


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
