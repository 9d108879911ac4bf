"""Timing helpers shared by ``bench_moe.py`` and ``compare_maxtext.py``.

Every figure is the median of repeated calls of an ahead-of-time compiled function (compile time
measured apart, one warm-up call first), so compilation and first-call costs never enter it.

Axis letters: T tokens, D model width, H dense hidden width.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Timing:
    """One timed function: median and all call times (ms), compile time (s), XLA temp bytes."""

    ms: float
    all_ms: list[float]
    compile_s: float
    temp_bytes: int


def compile_fn(fn: Callable, args: tuple) -> tuple[Any, float]:
    """AOT-compiles ``jit(fn)`` for ``args``; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def temp_bytes(compiled) -> int:
    """Scratch memory XLA allocates for one call (outputs and arguments not included)."""
    return int(compiled.memory_analysis().temp_size_in_bytes)


def time_compiled(compiled, args: tuple, reps: int, slow_s: float = 1e9) -> tuple[list, Any]:
    """(call times in ms, last output) after one warm-up call; one timed call only if the
    warm-up took longer than ``slow_s`` (keeps a full grid within minutes)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    if time.perf_counter() - t0 > slow_s:
        reps = 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def time_interleaved(cases: list[tuple], reps: int, slow_s: float = 1e9) -> tuple[list, Any]:
    """Times compiled (fn, args) pairs in alternation, one call of each per round, so that load
    drifts on a shared machine hit them alike; ratios of their medians are then fair.

    Returns (call times in ms per case, the first case's last output). One warm-up call each;
    a single round if the first case's warm-up took longer than ``slow_s``.
    """
    t0 = time.perf_counter()
    out = jax.block_until_ready(cases[0][0](*cases[0][1]))
    if time.perf_counter() - t0 > slow_s:
        reps = 1
    for compiled, args in cases[1:]:
        jax.block_until_ready(compiled(*args))
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(reps):
        for i, (compiled, args) in enumerate(cases):
            t0 = time.perf_counter()
            result = jax.block_until_ready(compiled(*args))
            times[i].append((time.perf_counter() - t0) * 1e3)
            out = result if i == 0 else out
    return times, out


def time_fn(fn: Callable, args: tuple, reps: int, slow_s: float = 1e9) -> Timing:
    compiled, compile_s = compile_fn(fn, args)
    times, _ = time_compiled(compiled, args, reps, slow_s)
    return Timing(statistics.median(times), times, compile_s, temp_bytes(compiled))


def matmul_gflops(size: int, dtype, reps: int = 10) -> float:
    """GFLOP/s of one jitted size^3 matmul: the machine's attainable rate for ``dtype``."""
    key_a, key_b = jax.random.split(jax.random.key(3))
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
    t = time_fn(lambda u, v: u @ v, (a, b), reps)
    return 2 * size**3 / (t.ms * 1e-3) / 1e9


def dense_swiglu_case(
    tokens: int, d_model: int, hidden: int, dtype, fused: bool = False
) -> tuple[Callable, tuple]:
    """The ideal: a dense SwiGLU MLP of hidden width H, forward+backward (grads of params and
    input of sum(y)), parameters float32 and cast to ``dtype`` at use like the MoE layer's.

    ``fused``: gate and up as one matmul of width 2H, as the MoE layer's experts do (faster on
    CPU); the plain three-matmul form is the usual reference (MaxText's benchmark uses it)."""
    keys = jax.random.split(jax.random.key(2), 4)
    shapes = [(d_model, hidden), (d_model, hidden), (hidden, d_model)]
    params = [
        jax.random.normal(k, s, jnp.float32) / s[0] ** 0.5
        for k, s in zip(keys[:3], shapes, strict=True)
    ]
    x_TD = jax.random.normal(keys[3], (tokens, d_model), jnp.float32).astype(dtype)

    def loss(p, x):
        w_gate, w_up, w_down = (w.astype(dtype) for w in p)
        if fused:
            h_T2H = x @ jnp.concatenate([w_gate, w_up], axis=1)
            h_TH = jax.nn.silu(h_T2H[:, :hidden]) * h_T2H[:, hidden:]
        else:
            h_TH = jax.nn.silu(x @ w_gate) * (x @ w_up)
        return jnp.sum((h_TH @ w_down).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1)), (params, x_TD)


def swiglu_fwd_bwd_flops(tokens: int, d_model: int, hidden: float) -> float:
    """3 matmuls of 2*T*D*H FLOPs forward, twice that backward."""
    return 3 * 3 * 2 * tokens * d_model * hidden


def load_average() -> float:
    """1-minute load average (the machine is shared: note it beside every timing)."""
    return round(os.getloadavg()[0], 2)


def write_json(path: Path | None, out: dict) -> None:
    """Writes a benchmark's figures to ``path`` (nothing when it is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
