"""The jitted train and eval steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dynmoe_jax.train.batches import Batch, put_batch
from dynmoe_jax.train.loss import RoutingStats, cross_entropy, forward
from dynmoe_jax.train.task import Task, TrainState


def _accumulated_grads(task: Task, params, batch: Batch):
    """(gradients, metrics, routing statistics) of the mean loss over ``grad_accum_steps``
    micro-batches (a scan); metrics and statistics are means over the micro-batches."""
    grad_fn = jax.value_and_grad(lambda p, b: forward(task, p, b), has_aux=True)
    n = task.config.train.grad_accum_steps
    if n == 1:
        (_, (metrics, routing)), grads = grad_fn(params, batch)
        return grads, metrics, routing
    micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    def body(acc, mb):
        (_, aux), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, (g, *aux)), None

    (_, aux_shape), grads_shape = jax.eval_shape(
        grad_fn, params, jax.tree.map(lambda x: x[0], micro)
    )
    zeros = jax.tree.map(jnp.zeros_like, (grads_shape, *aux_shape))
    sums, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / n, sums)


TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict]]


def make_train_step(task: Task) -> TrainStep:
    """A jitted step. A non-finite loss or gradient leaves params and optimizer state as they
    were and is counted in the state (``nonfinite_steps``, ``first_nonfinite_step``)."""

    def train_step(state: TrainState, batch: Batch):
        grads, metrics, routing = _accumulated_grads(task, state.params, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
        params = update_routing(task, optax.apply_updates(state.params, updates), routing)
        keep_if_bad = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        first_bad = (state.first_nonfinite_step < 0) & ~finite
        new_state = TrainState(
            step=state.step + 1,
            params=jax.tree.map(keep_if_bad, params, state.params),
            opt_state=jax.tree.map(keep_if_bad, opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(first_bad, state.step + 1, state.first_nonfinite_step),
        )
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = task.schedule(state.step)
        metrics["nonfinite_steps"] = new_state.nonfinite_steps
        return new_state, metrics

    shardings = task.state_shardings
    return jax.jit(
        train_step,
        in_shardings=(shardings, task.batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def update_routing(task: Task, params: Any, routing: RoutingStats | None) -> Any:
    """``params`` with each MoE layer's routing state moved by the rules of ``moe/balance.py``
    from this step's routing statistics (means over the global batch, and over its
    micro-batches)."""
    model_cfg = task.config.model
    moe = model_cfg.moe
    if routing is None or (moe.target_k is None and not moe.bias_balance):
        return params
    model = nnx.merge(task.graphdef, params)
    k_L, load_LE = routing
    first = 0
    for layer in model.moe_layers():
        count = model_cfg.num_moe_layers if model_cfg.scan_layers else 1
        at = slice(first, first + count) if model_cfg.scan_layers else first
        layer.update_routing(k_L[at], load_LE[at])
        first += count
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def make_eval_step(task: Task) -> Callable[[Any, Batch], dict]:
    def eval_step(params, batch: Batch):
        model = nnx.merge(task.graphdef, params)
        weights_BT = batch["weights"]
        logits, layer = model(batch["inputs"], batch.get("valid"))
        nll, count = cross_entropy(logits, batch["targets"], weights_BT)
        out = {"nll": nll, "tokens": count}
        if layer:
            # Weighted sums, so that batches add up by tokens (evaluate divides by the total).
            experts_LBT = layer["token_experts"].astype(jnp.float32)
            out["experts_per_layer"] = jnp.sum(experts_LBT * weights_BT[None], axis=(1, 2))
            out["dropped_fraction"] = jnp.mean(layer["dropped_fraction"]) * count
        return out

    jitted = jax.jit(eval_step, in_shardings=(task.state_shardings.params, task.batch_sharding))
    size = task.config.data.batch_size
    return lambda params, batch: jitted(params, put_batch(task.batch_sharding, size, batch))
