"""The training loss: the language model's cross-entropy plus the weighted auxiliary losses."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dynmoe_jax.moe import metrics as layer_metrics
from dynmoe_jax.train.batches import Batch
from dynmoe_jax.train.task import Task


def cross_entropy(logits_BTV, targets_BT, weights_BT) -> tuple[jax.Array, jax.Array]:
    """Sum of weighted token negative log-likelihoods (float32) and the weight sum."""
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), targets_BT
    )
    return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


class RoutingStats(NamedTuple):
    """What the update of the routing state (``step.update_routing``) reads from a batch: per
    MoE layer, the mean experts per token [L] and each expert's share of the selections
    [L, E]."""

    k_L: jax.Array
    load_LE: jax.Array


def forward(
    task: Task, params, batch: Batch
) -> tuple[jax.Array, tuple[dict[str, jax.Array], RoutingStats | None]]:
    """Loss, and (the logged metrics, the routing statistics; None without MoE layers) of one
    batch: lm loss plus the weighted aux losses, each averaged over the MoE layers (the paper
    leaves the reduction open; a mean keeps weights depth-free)."""
    model = nnx.merge(task.graphdef, params)
    logits, layer = model(batch["inputs"], batch.get("valid"))
    nll, count = cross_entropy(logits, batch["targets"], batch["weights"])
    lm_loss = nll / jnp.maximum(count, 1.0)
    w = task.config.loss
    weights = {"load_balance_loss": w.load_balance_weight, "dynamic_loss": w.dynamic_weight,
               "z_loss": w.z_loss_weight}  # fmt: skip
    # Without MoE layers the aux losses are logged as 0, so every run logs the same keys.
    metrics = {name: jnp.zeros(()) for name in weights}
    if layer:
        metrics |= layer_metrics.summarise(layer)
    loss = lm_loss
    for name, weight in weights.items():
        loss = loss + weight * metrics[name]
    metrics |= {"lm_loss": lm_loss, "loss": loss}
    routing = RoutingStats(layer["experts_per_token"], layer["expert_load"]) if layer else None
    return loss, (metrics, routing)
