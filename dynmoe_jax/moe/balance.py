"""Routing that keeps its budget: a controller for top-p's threshold, and aux-loss-free
balancing with a per-expert bias. Both are state of each MoE layer that changes after every
training step, by rules, not by gradients.

* **Target mean k** (``moe.target_k``). The threshold p of each layer is state. After each
  step a proportional-integral controller moves it from the step's measured mean experts per
  token k of that layer over the global batch (the mean of the micro-batches' means under
  gradient accumulation). It acts on the logit of p, so p stays in (0, 1) and a step moves p
  least where k is least sensitive to it, near 0 and 1:

      e = (target - k) / target                      relative error, positive: too few experts
      I <- clip(I + e, -I_MAX, I_MAX)                the integral (anti-windup)
      p = sigmoid(logit(p0) + KP * e + KI * I)       p0: the config's threshold

  The integral does the tracking (it settles where e averages 0); the proportional term damps
  the response to a step's noise. KP and KI are in logit units per unit of relative error.
* **Bias balance** (``moe.bias_balance`` = the rate r). Each expert e has a bias b_e that
  moves it in the order of selection only (``routing.route``): after each step
  ``b_e <- b_e + r * sign(1/E - load_e)``, load_e the share of the step's selections that went
  to e: an expert busier than the mean loses rank, a quieter one gains. The combine weights
  never see b, and the load-balance loss weight can be 0.

The state lives with the parameters as ``RoutingState`` variables (so checkpoints, shardings,
restores and the decode layout carry it) and the optimizer leaves it alone (``FROZEN``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

KP = 0.3
KI = 0.4
I_MAX = 50.0
FROZEN = ("router_threshold", "router_integral", "router_bias_E")  # the state's names


class RoutingState(nnx.Param):
    """A router's state, updated by the rules above after each step; never by the optimizer
    (its gradient is stopped where the layer reads it)."""


def threshold_step(
    threshold: jax.Array, integral: jax.Array, k: jax.Array, target: float, base: float
) -> tuple[jax.Array, jax.Array]:
    """One controller update of (threshold, integral) from the measured mean k (any shape,
    elementwise: a scanned model's layers at once)."""
    error = (target - k) / target
    integral = jnp.clip(integral + error, -I_MAX, I_MAX)
    logit = jnp.log(base) - jnp.log1p(-base) if base < 1.0 else jnp.float32(20.0)
    return jax.nn.sigmoid(logit + KP * error + KI * integral), integral


def bias_step(bias_AE: jax.Array, load_AE: jax.Array, rate: float) -> jax.Array:
    """One bias update from each expert's share of the selections (last axis E; A: none, or a
    scanned model's layers)."""
    num_experts = load_AE.shape[-1]
    return bias_AE + rate * jnp.sign(1.0 / num_experts - load_AE)


def initial(name: str, moe, shape: tuple[int, ...]) -> jax.Array:
    """A fresh routing state variable ``name`` of the layer config ``moe`` (what the layer
    itself starts from): the config's threshold, and zeros for the integral and the bias."""
    fill = moe.threshold if name == "router_threshold" else 0.0
    return jnp.full(shape, fill, jnp.float32)
