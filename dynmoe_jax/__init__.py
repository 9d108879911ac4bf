"""dynmoe_jax: Mixture-of-Experts with dynamic top-p routing in JAX/Flax NNX.

Axis letters. Every module names arrays by their shape with these letters (``x_BTD``,
``w_EDF``) and uses them in einsum strings; each letter means one thing everywhere, and
tests/test_axis_letters.py holds the package's names to this table.

==  ==========================================================================
B   batch (sequences, or the rows of a batch of requests)
T   sequence positions (the queries, in attention)
U   key/value positions in attention
D   model width
F   feed-forward hidden width (a dense layer's or one expert's)
V   vocabulary
L   layers of a stack: the decoder's, its MoE layers' (per-layer metrics), one super-block's
O   super-blocks of a scanned decoder (``moe_every`` layers each)
N   attention heads (the queries')
J   key/value heads in grouped-query attention (J divides N)
I   query heads that share one key/value head (N = J * I)
H   width of one head
E   experts
W   the decode path's loop over the experts a call selected (at most E)
G   routing groups
S   tokens per routing group
M   all tokens of one call (B * T = G * S)
K   ranks: a token's choices in descending router probability
P   entries of the priority list (a group's (rank, token) pairs, S * K)
Q   priority-list entries of every group of a call (G * P)
C   capacity: slots per expert per group (the capacity modes)
R   rows of the grouped buffer: the groups' token budgets plus block padding
Z   rows of one chunk of the grouped buffer (the fused SwiGLU's loop)
X   input width of a matmul over rows (D, F, or N * H)
Y   output width of a matmul over rows
A   any axes: where one function serves several layouts, the axes that differ between them
    (rows [..., D]; a row table [E, C] or [R]; heads N or J)
==  ==========================================================================

A digit is an axis of that size: ``1`` an axis kept for broadcasting (``w_M1``), ``2`` the
stacked gate and up projections of SwiGLU ([E, 2F, D] in an imported checkpoint). A lower-case
letter is one device's share of that axis under ``shard_map`` (``x_gSD``: this device's groups).
"""

from dynmoe_jax.moe.config import Dispatch, MoEConfig, Router
from dynmoe_jax.moe.layer import MoELayer
from dynmoe_jax.moe.routing import top_k_mask, top_p_mask

__all__ = ["Dispatch", "MoEConfig", "MoELayer", "Router", "top_k_mask", "top_p_mask"]
__version__ = "0.1.0"
