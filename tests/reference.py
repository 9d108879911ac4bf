"""Independent float64 NumPy references that the tests compare the JAX code against.

Written as plain per-token, per-expert loops on purpose: slow, obvious, and sharing no code
with the package.
"""

from __future__ import annotations

import math

import numpy as np


def descending(p: np.ndarray) -> list[int]:
    """Expert ids by descending probability, ties to the lower index."""
    return sorted(range(len(p)), key=lambda e: (-float(p[e]), e))


def top_p_set(p: np.ndarray, threshold: float, max_k: int | None = None) -> list[int]:
    if threshold >= 1.0:  # the whole mixture, by definition (exact softmax has no zero)
        return descending(p)[: max_k or len(p)]
    chosen, total = [], 0.0
    for e in descending(np.asarray(p, np.float64)):
        if chosen and (total >= threshold or (max_k is not None and len(chosen) >= max_k)):
            break
        chosen.append(e)
        total += float(p[e])
    return chosen


def top_k_set(p: np.ndarray, k: int) -> list[int]:
    return descending(p)[:k]


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def swiglu(x, w_gate, w_up, w_down):
    g, u = x @ w_gate, x @ w_up
    return ((g / (1.0 + np.exp(-g))) * u) @ w_down


def moe_loop(x_BTD, params, *, router, threshold, top_k, max_k, group_size, capacity, budget=None):
    """Per-token, per-expert MoE forward with priority-ordered capacity.

    Returns (y_BTD, selections, dropped). ``capacity=None`` means unlimited per expert;
    ``budget`` (None: unlimited) caps the selections one group keeps, in the same order.
    """
    w_r, w_gate, w_up, w_down = (
        np.asarray(params[k], np.float64) for k in ("router", "gate", "up", "down")
    )
    b, t, d = x_BTD.shape
    x = np.asarray(x_BTD, np.float64).reshape(-1, group_size, d)
    y = np.zeros_like(x)
    selections = dropped = 0
    for g in range(x.shape[0]):
        chosen, weights = [], []
        for s in range(group_size):
            p = softmax(x[g, s] @ w_r)
            if router == "top_p":
                sel = top_p_set(p, threshold, max_k)
                w = {e: p[e] for e in sel}
            else:
                sel = top_k_set(p, top_k)
                total = sum(p[e] for e in sel)
                w = {e: p[e] / total for e in sel}
            chosen.append(sel)
            weights.append(w)
        used, group_used = [0] * w_r.shape[1], 0
        for rank in range(w_r.shape[1]):  # every first choice before any second choice
            for s in range(group_size):
                if rank >= len(chosen[s]):
                    continue
                e = chosen[s][rank]
                selections += 1
                full = capacity is not None and used[e] >= capacity
                if full or (budget is not None and group_used >= budget):
                    dropped += 1
                    continue
                used[e] += 1
                group_used += 1
                y[g, s] += weights[s][e] * swiglu(x[g, s], w_gate[e], w_up[e], w_down[e])
    return y.reshape(b, t, d), selections, dropped


def capacity(capacity_factor, group_size, k, num_experts):
    if capacity_factor is None:
        return None
    return max(1, min(group_size, math.ceil(capacity_factor * group_size * k / num_experts)))


def budget(capacity_factor, group_size, k, max_selections):
    if capacity_factor is None:
        return None
    return max(1, min(group_size * max_selections, math.ceil(capacity_factor * k * group_size)))


def biased_order(p: np.ndarray, bias: np.ndarray) -> list[int]:
    """Expert ids by descending log p + bias (float64), ties to the lower index."""
    score = np.log(np.asarray(p, np.float64)) + np.asarray(bias, np.float64)
    return sorted(range(len(p)), key=lambda e: (-float(score[e]), e))


def top_p_set_biased(p: np.ndarray, threshold: float, bias: np.ndarray) -> list[int]:
    """Top-p walking the biased order and summing the unbiased probabilities."""
    chosen, total = [], 0.0
    for e in biased_order(p, bias):
        if chosen and total >= threshold:
            break
        chosen.append(e)
        total += float(p[e])
    return chosen


def top_k_set_biased(p: np.ndarray, k: int, bias: np.ndarray) -> list[int]:
    return biased_order(p, bias)[:k]
