"""The benchmarked MoE layer, built from the public API: its shape, its forward+backward
program, and its router scaled so that top-p selects as many experts as a trained one.

A fresh router's probabilities are flat, so top-p at the usual thresholds selects far more
experts than a trained router does. ``calibrate`` finds the one factor on the router weights
that brings top-p's mean experts per token to a target; benchmarks apply it to every router
of that expert count, so top-k and top-p cases see the same logits.

Axis letters: B batch, S sequence (one routing group), D model, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import MoEConfig, MoELayer
from dynmoe_jax.moe import routing

ROUTERS = {  # the benchmarks' router names, as MoEConfig fields
    "top1": {"router": "top_k", "top_k": 1},
    "top2": {"router": "top_k", "top_k": 2},
    "topp": {"router": "top_p"},
}
DISPATCHES = ("einsum", "index", "grouped")
STATS = ("experts_per_token", "dropped_fraction", "slots_per_token")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """The input and the settings every layer of one benchmark shares."""

    tokens: int  # T = batch * seq_len
    seq_len: int  # one routing group per sequence
    d_model: int
    d_ff: int  # one expert's hidden width
    dtype: str = "float32"
    threshold: float = 0.4
    capacity_factor: float | None = 1.25

    def input(self, seed: int = 1) -> jax.Array:
        """A random x [B, S, D] in the compute dtype."""
        shape = (self.tokens // self.seq_len, self.seq_len, self.d_model)
        return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(self.dtype)


def make_layer(shape: LayerShape, num_experts: int, router: str, dispatch: str,
               scale: float = 1.0, **changes: Any) -> MoELayer:  # fmt: skip
    """The layer (seed 0) with ``router`` (a key of ``ROUTERS``), ``dispatch`` and any other
    ``MoEConfig`` field in ``changes``; its router weights times ``scale``."""
    fields = {"threshold": shape.threshold, "capacity_factor": shape.capacity_factor}
    fields.update({**ROUTERS[router], **changes})
    fields.update(num_experts=num_experts, d_model=shape.d_model, d_ff=shape.d_ff)
    config = MoEConfig(dispatch=dispatch, dtype=jnp.dtype(shape.dtype), **fields)
    layer = MoELayer(config, rngs=nnx.Rngs(0))
    layer.router_DE[...] = layer.router_DE[...] * scale
    return layer


@functools.partial(jax.jit, static_argnames="threshold")
def _mean_top_p_k(router_DE: jax.Array, x: jax.Array, threshold: float) -> jax.Array:
    x_MD = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    probs_ME = jax.nn.softmax(x_MD @ router_DE, axis=-1)
    return jnp.mean(jnp.sum(routing.top_p_mask(probs_ME, threshold), axis=-1))


def mean_top_p_k(router_DE: jax.Array, x: jax.Array, threshold: float) -> float:
    """Top-p's mean experts per token over every token of ``x`` under these router weights."""
    return float(_mean_top_p_k(router_DE, x, threshold=threshold))


def calibrate(router_DE: jax.Array, x: jax.Array, threshold: float, target: float,
              steps: int = 25) -> float:  # fmt: skip
    """The factor on the router weights that gives top-p a mean of ``target`` experts on
    ``x``: bisection in log scale over [0.1, 100] (larger weights, a peakier softmax, fewer
    experts). A target out of reach ends at the nearer end of the range."""
    lo, hi = math.log(0.1), math.log(100.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if mean_top_p_k(router_DE * math.exp(mid), x, threshold) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def fwd_bwd(layer: MoELayer) -> tuple[Any, nnx.State]:
    """(fn, params): ``fn(params, x)`` returns the gradients of sum(y) with respect to every
    parameter and to x, and the routing statistics ``STATS`` of the forward pass."""
    graphdef, params = nnx.split(layer)

    def loss(p, x):
        y, aux = nnx.merge(graphdef, p)(x)
        return jnp.sum(y.astype(jnp.float32)), {k: aux[k] for k in STATS}

    return jax.grad(loss, argnums=(0, 1), has_aux=True), params


class IdentityExperts(MoELayer):
    """The layer with identity experts: what remains is routing, dispatch and combine (the
    capacity modes; the grouped mode's experts are not a method to swap out)."""

    def experts(self, x_EXD: jax.Array) -> jax.Array:
        return x_EXD


def without_experts(layer: MoELayer) -> MoELayer:
    """``layer`` itself, its experts made the identity (see ``IdentityExperts``)."""
    layer.__class__ = IdentityExperts
    return layer
