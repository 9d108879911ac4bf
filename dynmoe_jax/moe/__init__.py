"""The MoE layer: routing, the dispatch modes, the experts and their kernels.

``layer`` (MoELayer), ``config`` (MoEConfig, Dispatch), ``routing`` (top-p, top-k, aux
losses), ``priority`` (the selection order every mode shares), ``capacity`` (index, einsum),
``grouped`` (one budget per group), ``decode`` (few tokens: only the selected experts),
``experts`` (the SwiGLU and the two weight layouts), ``kernels`` (grouped matmuls),
``expert_parallel`` (under an ``expert`` mesh axis).
"""

from dynmoe_jax.moe.config import Dispatch, MoEConfig
from dynmoe_jax.moe.layer import MoELayer

__all__ = ["Dispatch", "MoEConfig", "MoELayer"]
