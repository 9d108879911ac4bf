"""The one table of layer metrics: the layer returns exactly its entries, and the training
log's summaries follow it (hand-worked figures)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynmoe_jax.moe import metrics
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.moe.layer import MoELayer


def test_the_layer_returns_exactly_the_metrics_of_the_table():
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, router="top_p", threshold=0.5)
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    _, aux = layer(jax.random.normal(jax.random.key(1), (2, 3, 8)))
    assert set(aux) == set(metrics.LAYER_METRICS)


def test_summaries_over_layers_follow_the_table():
    layers = {name: jnp.asarray([1.0, 4.0, 2.5]) for name in metrics.LAYER_METRICS}
    layers["expert_load"] = jnp.asarray([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    got = metrics.summarise(layers)
    assert float(got["experts_per_token"]) == 2.5  # mean of 1, 4, 2.5
    assert float(got["experts_per_token_max"]) == 4.0
    assert float(got["experts_per_token_min"]) == 1.0
    assert float(got["z_loss"]) == 2.5
    np.testing.assert_array_equal(got["experts_per_layer"], [1.0, 4.0, 2.5])
    np.testing.assert_array_equal(got["threshold_per_layer"], [1.0, 4.0, 2.5])
    assert not {"token_experts", "expert_load", "expert_load_per_layer"} & set(got)
