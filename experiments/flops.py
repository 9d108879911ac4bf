"""The useful FLOPs of one SwiGLU layer (3 weight matrices), for the layer benchmarks. A
model's parameters per token come from the library (``dynmoe_jax.plan``)."""

from __future__ import annotations

SWIGLU_MATRICES = 3  # gate, up and down


def swiglu_fwd_bwd_flops(tokens: int, d_model: int, hidden: float) -> float:
    """FLOPs of a SwiGLU of hidden width ``hidden`` forward and backward: each matrix costs
    2*T*D*H forward and twice that backward (gradients of its input and of its weight)."""
    return SWIGLU_MATRICES * 3 * 2 * tokens * d_model * hidden
