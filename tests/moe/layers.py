"""A small MoE layer without capacity limits, an input for it and its jitted forward: what the
decode-path and per-expert-layout tests share."""

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import MoEConfig, MoELayer

E, D, F = 8, 16, 32


def layer(**kw) -> MoELayer:
    kw = {"num_experts": E, "d_model": D, "d_ff": F, "capacity_factor": None, **kw}
    return MoELayer(MoEConfig(**kw), rngs=nnx.Rngs(0))


def x(shape, seed=1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def forward(moe: MoELayer, x_BTD: jax.Array) -> jax.Array:
    return nnx.jit(lambda m, v: m(v))(moe, x_BTD)
