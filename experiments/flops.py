"""FLOP and parameter arithmetic of SwiGLU feed-forward layers (3 weight matrices each), shared
by the analyses (activated parameters per token) and the benchmarks (useful FLOPs)."""

from __future__ import annotations

from ml_collections import ConfigDict

SWIGLU_MATRICES = 3  # gate, up and down


def ffn_params_per_token(config: ConfigDict, experts_per_token: float) -> float:
    """Feed-forward parameters a token activates, summed over layers.

    A dense layer activates its whole width; an MoE layer activates ``experts_per_token``
    experts (the router ignored: it is d_model x E, tiny beside the experts)."""
    d, layers = config.model.d_model, config.model.num_layers
    if config.model.ffn == "dense":
        return float(SWIGLU_MATRICES * d * config.model.d_ff * layers)
    return SWIGLU_MATRICES * d * config.moe.d_ff * experts_per_token * layers


def swiglu_fwd_bwd_flops(tokens: int, d_model: int, hidden: float) -> float:
    """FLOPs of a SwiGLU of hidden width ``hidden`` forward and backward: each matrix costs
    2*T*D*H forward and twice that backward (gradients of its input and of its weight)."""
    return SWIGLU_MATRICES * 3 * 2 * tokens * d_model * hidden
