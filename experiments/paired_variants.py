"""The models of the paired-seed comparison: top-p against top-2 at equal compute, two sizes,
and a heterogeneous top-k model built from a trained top-p model's layer profile.

Every variant is the router comparison's model (``variants.lm_config``) with grouped dispatch,
one routing group per step's batch and a budget of ``BUDGET_FACTOR`` x its k, so a variant
computes the expert rows its k pays for. A seed fixes the initial weights (no variant adds or
reshapes a trained parameter), the data order and the evaluation tokens, so two variants of one
seed differ in their routing only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ml_collections import ConfigDict

from experiments import variants

# The paper's top-p used 1.76 experts per token against top-2's 2: 88% of the rows.
PAPER_K = 1.76
BUDGET_FACTOR = 1.05
BIAS_RATE = 0.01
# The larger model: the same widths with 12x the experts, so about 10x the parameters at the
# same activated parameters per token (what these CPUs can train 10 seeds of).
EXPERTS = {"small": 8, "large": 96}
# The fixed threshold of "top_p_fixed" at each size: the mean over layers of the thresholds
# the controller settled on in seed 0's "top_p_t1.76" run (final log), to two decimals.
FIXED_P = {"small": 0.53, "large": 0.14}
PROFILE_SOURCE = "top_p_fixed"  # the top-p model whose layer profile sizes "hetero"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One routing of the comparison. ``k``: top-k's k, or top-p's target (None: fixed p)."""

    label: str
    router: str
    k: float | None
    bias: bool = False


VARIANTS = {
    "top2": Variant("top-2", "top_k", 2),
    "top_p_t2": Variant("top-p, target 2.0", "top_p", 2.0),
    "top_p_t1.76": Variant("top-p, target 1.76", "top_p", PAPER_K),
    "top_p_fixed": Variant("top-p, fixed p", "top_p", None),
    "top1": Variant("top-1", "top_k", 1),
    "top_p_t1.76_bias": Variant("top-p, target 1.76, bias balance", "top_p", PAPER_K, bias=True),
    "hetero": Variant("top-k, k per layer from top-p", "top_k", None),
}
BASELINE = "top2"
# The larger model trains about twice as slowly here: it leaves out the bias variant.
LARGE_VARIANTS = ("top2", "top_p_t2", "top_p_t1.76", "top_p_fixed", "top1", "hetero")
SIZES = tuple(EXPERTS)


def check_name(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is invalid: allowed {' | '.join(allowed)}")


def lm_config(
    name: str,
    seed: int,
    size: str,
    scale: int = 1,
    steps: int | None = None,
    per_layer_k: tuple[int, ...] | None = None,
) -> ConfigDict:
    """The config of variant ``name`` at ``size``; "hetero" takes its ``per_layer_k``."""
    check_name("variant", name, tuple(VARIANTS))
    check_name("size", size, SIZES)
    if (name == "hetero") != (per_layer_k is not None):
        raise ValueError("per_layer_k is given for variant 'hetero' and for it only")
    v = VARIANTS[name]
    c = variants.lm_config("top2_budget", seed, scale, steps=steps)
    c.moe.num_experts = EXPERTS[size]
    c.eval_every_steps = max(1, c.num_train_steps // 4)
    c.moe.router = v.router
    c.moe.capacity_factor = BUDGET_FACTOR
    c.moe.top_k = per_layer_k if name == "hetero" else (int(v.k) if v.router == "top_k" else 2)
    c.moe.target_k = v.k if v.router == "top_p" else None
    c.moe.threshold = FIXED_P[size] if v.router == "top_p" and v.k is None else 0.4
    c.moe.expected_k = PAPER_K if name == "top_p_fixed" else None
    c.moe.bias_balance = BIAS_RATE if v.bias else 0.0
    c.loss.load_balance_weight = 0.0 if v.bias else c.loss.load_balance_weight
    return c


def per_layer_k(experts_L: Sequence[float], num_experts: int) -> tuple[int, ...]:
    """Each layer's mean experts per token rounded to an integer k in 1..num_experts so that
    the k sum to the means' sum rounded (largest remainders round up first, the lower layer
    first among equals): a top-k model computing the rows the top-p model computed."""
    means = [min(max(float(m), 1.0), float(num_experts)) for m in experts_L]
    total = min(max(round(sum(means)), len(means)), num_experts * len(means))
    k = [math.floor(m) for m in means]
    by_remainder = sorted(range(len(means)), key=lambda i: (-(means[i] - k[i]), i))
    for i in by_remainder[: total - sum(k)]:
        k[i] += 1
    return tuple(k)


def run_name(name: str, seed: int, size: str, scale: int) -> str:
    return f"{name}-{size}-s{seed}-x{scale}"
