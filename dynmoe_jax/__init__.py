"""dynmoe_jax: Mixture-of-Experts with dynamic top-p routing in JAX/Flax NNX."""

from dynmoe_jax.dispatch import Dispatch
from dynmoe_jax.moe import MoEConfig, MoELayer
from dynmoe_jax.routing import Router, top_k_mask, top_p_mask

__all__ = ["Dispatch", "MoEConfig", "MoELayer", "Router", "top_k_mask", "top_p_mask"]
__version__ = "0.1.0"
