"""The routing metrics of one MoE layer call, and the one table of how each is summarised.

``LAYER_METRICS`` lists every metric a layer returns, each with its summary over a model's
MoE layers (``Over``): the decoder stacks all of them along a leading layer axis, and the
training loss logs each summary. Adding a metric means adding one entry here.

Axis letters: E experts; ``...`` the token axes (groups and tokens per group).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import routing


class Over(str, enum.Enum):
    """How a metric is summarised over the MoE layers in the training log."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"
    LAYERS = "layers"  # logged per layer, as ``{name}_per_layer``
    NONE = "none"  # stacked for the caller, not logged (per token)


LAYER_METRICS: dict[str, Over] = {
    "load_balance_loss": Over.MEAN,
    "dynamic_loss": Over.MEAN,
    "z_loss": Over.MEAN,
    "experts_per_token": Over.MEAN,
    "experts_per_token_max": Over.MAX,
    "experts_per_token_min": Over.MIN,
    "slots_per_token": Over.MEAN,
    "dropped_fraction": Over.MEAN,
    "router_confidence": Over.MEAN,
    "max_load_ratio": Over.MEAN,
    "expert_load": Over.NONE,  # the routing state's update reads it (train.loss.RoutingStats)
    "threshold": Over.LAYERS,
    "token_experts": Over.NONE,
}
# Per-layer views of metrics that also have a summary.
ALSO_PER_LAYER = {"experts_per_token": "experts_per_layer"}

_REDUCE = {Over.MEAN: jnp.mean, Over.MAX: jnp.max, Over.MIN: jnp.min}


def summarise(layers: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The training log's figures from the metrics stacked over the layers ([L, ...] each)."""
    out = {}
    for name, over in LAYER_METRICS.items():
        if over in _REDUCE:
            out[name] = _REDUCE[over](layers[name])
        elif over is Over.LAYERS:
            out[f"{name}_per_layer"] = layers[name]
    out.update({alias: layers[name] for name, alias in ALSO_PER_LAYER.items()})
    return out


def routing_metrics(logits, probs, r: routing.Routing, kept, slots_per_token, valid) -> dict:
    """Named aux losses and routing statistics of one layer call: means over the valid
    tokens (all when ``valid`` is None). The layer adds ``token_experts`` and ``threshold``.

    kept: selections that were computed; slots_per_token: expert rows computed per token
    (E*C/S with capacity; grouped: rows in use, block padding included, per token).
    """
    num_experts = probs.shape[-1]
    mask_f = r.mask.astype(jnp.float32)
    per_token = jnp.sum(mask_f, axis=-1)
    total = jnp.sum(per_token)
    selections = jnp.maximum(total, 1.0)  # 0 only when every token is padding
    load_E = jnp.sum(mask_f.reshape(-1, num_experts), axis=0) / selections
    counts = jnp.ones_like(per_token, bool) if valid is None else valid
    mean = lambda x: routing.token_mean(x[..., None], valid)[0]  # noqa: E731
    return {
        "load_balance_loss": routing.load_balance_loss(probs, r.mask, valid),
        "dynamic_loss": routing.dynamic_loss(logits, valid),
        "z_loss": routing.z_loss(logits, valid),
        "experts_per_token": mean(per_token),
        "experts_per_token_max": jnp.max(jnp.where(counts, per_token, 0.0)),
        "experts_per_token_min": jnp.min(jnp.where(counts, per_token, num_experts)),
        "slots_per_token": jnp.asarray(slots_per_token, jnp.float32),
        "dropped_fraction": (total - kept) / selections,
        "expert_load": load_E,
        "max_load_ratio": num_experts * jnp.max(load_E),
        "router_confidence": mean(jnp.max(probs, axis=-1)),
    }
