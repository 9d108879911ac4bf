"""The grouped MoE layer gives the same outputs and gradients on every backend of its grouped
matmul: the CPU's fused loop, jax.lax.ragged_dot and tokamax (its "xla" implementation on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import MoELayer


def _layer(backend: str) -> MoELayer:
    # A budget that binds (capacity_factor 0.6) and blocks of 4: the buffer has block padding
    # inside the groups, rows past them, and experts without rows in some groups.
    return MoELayer(num_experts=8, d_model=16, d_ff=32, router="top_p", threshold=0.6,
                    capacity_factor=0.6, group_size=16, dispatch="grouped", block_size=4,
                    matmul_backend=backend, rngs=nnx.Rngs(0))  # fmt: skip


def _output_and_grads(backend: str):
    layer = _layer(backend)
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
    y, grads = _output_and_grads(backend)
    y_cpu, grads_cpu = _output_and_grads("blocks")
    np.testing.assert_allclose(y, y_cpu, rtol=1e-5, atol=1e-6)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = dict(jax.tree_util.tree_leaves_with_path(grads_cpu))[path]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(path))
