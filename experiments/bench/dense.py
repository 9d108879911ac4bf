"""The ideal an MoE layer is measured against, and the machine's attainable matmul rate.

The ideal of a layer whose tokens use k experts of width F on average is a dense SwiGLU MLP of
hidden width k * F: the same useful FLOPs, with no routing, no dispatch and no padding.

Axis letters: T tokens, D model width, H dense hidden width.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from experiments.bench.harness import Bench

DENSE_SEED = 2


def dense_swiglu(tokens: int, d_model: int, hidden: int, dtype,
                 fused: bool = False) -> tuple[Callable, tuple]:  # fmt: skip
    """(fn, args): a dense SwiGLU of hidden width H forward+backward (gradients of sum(y) with
    respect to its parameters and input), parameters float32 and cast to ``dtype`` at use, as
    the MoE layer's are.

    ``fused``: gate and up as one matmul of width 2H, as the MoE layer's experts do (faster on
    CPU); the plain three-matmul form is the usual reference (MaxText's benchmark uses it)."""
    keys = jax.random.split(jax.random.key(DENSE_SEED), 4)
    shapes = [(d_model, hidden), (d_model, hidden), (hidden, d_model)]
    params = [
        jax.random.normal(k, s, jnp.float32) / s[0] ** 0.5
        for k, s in zip(keys[:3], shapes, strict=True)
    ]
    x_TD = jax.random.normal(keys[3], (tokens, d_model), jnp.float32).astype(dtype)

    def loss(p, x_TD):
        w_gate_DH, w_up_DH, w_down_HD = (w.astype(dtype) for w in p)
        if fused:
            h_T2H = x_TD @ jnp.concatenate([w_gate_DH, w_up_DH], axis=1)
            h_TH = jax.nn.silu(h_T2H[:, :hidden]) * h_T2H[:, hidden:]
        else:
            h_TH = jax.nn.silu(x_TD @ w_gate_DH) * (x_TD @ w_up_DH)
        return jnp.sum((h_TH @ w_down_HD).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1)), (params, x_TD)


def matmul_gflops(size: int, dtype, reps: int = 10) -> float:
    """GFLOP/s of one jitted size^3 matmul (median call): the machine's attainable rate for
    ``dtype``, against which a layer's useful rate is read."""
    key_a, key_b = jax.random.split(jax.random.key(3))
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
    bench = Bench(reps)
    ms = bench.time({"matmul": bench.compile(lambda u, v: u @ v, (a, b))}).median("matmul")
    return 2 * size**3 / (ms * 1e-3) / 1e9
