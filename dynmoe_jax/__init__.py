"""dynmoe_jax: Mixture-of-Experts with dynamic top-p routing in JAX/Flax NNX.

Axis letters. Every module names arrays by their shape with these letters (``x_BTD``,
``w_EDF``) and uses them in einsum strings; each letter means one thing everywhere.

==  ==========================================================================
B   batch (sequences)
T   sequence positions (the queries, in attention)
U   key/value positions in attention
D   model width
F   feed-forward hidden width (a dense layer's or one expert's)
V   vocabulary
L   layers
N   attention heads (the queries')
J   key/value heads in grouped-query attention (J divides N)
H   width of one head
E   experts
G   routing groups
S   tokens per routing group
M   all tokens of one call (B * T = G * S)
K   ranks: a token's choices in descending router probability
P   entries of the priority list (a group's (rank, token) pairs, S * K)
Q   priority-list entries of every group of a call (G * P)
C   capacity: slots per expert per group (the capacity modes)
R   rows of the grouped buffer: the groups' token budgets plus block padding
X   input width of a grouped matmul (D or F)
Y   output width of a grouped matmul (F, 2F or D)
==  ==========================================================================

A literal ``2`` in a name is the stacked gate and up projections of SwiGLU (``w_ED2F``).
"""

from dynmoe_jax.moe.config import Dispatch, MoEConfig
from dynmoe_jax.moe.layer import MoELayer
from dynmoe_jax.moe.routing import Router, top_k_mask, top_p_mask

__all__ = ["Dispatch", "MoEConfig", "MoELayer", "Router", "top_k_mask", "top_p_mask"]
__version__ = "0.1.0"
