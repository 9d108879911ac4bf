"""MoEConfig: the hyper-parameters of one MoE layer, validated on construction, and the
dispatch modes.

Axis letters: S tokens per group, E experts, K ranks a token may select.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any

import jax.numpy as jnp

from dynmoe_jax.moe import capacity as capacity_lib
from dynmoe_jax.moe import grouped
from dynmoe_jax.moe.grouped import DropOrder
from dynmoe_jax.moe.kernels.grouped_matmul import Backend
from dynmoe_jax.moe.routing import Router
from dynmoe_jax.validation import check, enum_value, invalid, is_int


class Dispatch(str, enum.Enum):
    EINSUM = "einsum"
    INDEX = "index"
    GROUPED = "grouped"


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of one MoE layer; validated on construction, before any tracing.

    capacity_factor: None means no dropping (capacity = group size; grouped: budget = S * K).
    expected_k: mean experts per token that top-p's capacity or budget is sized for (top-k
      uses k).
    group_size: tokens per routing group (None: one group per sequence).
    dispatch: 'grouped' (the default: one budget per group, ``ceil(capacity_factor * k * S)``
      selections, any expert taking any share; faster than 'index' and with fewer temporaries
      in the CPU layer benchmark, experiments/RESULTS.md) | 'index' | 'einsum' (per-expert
      capacity); see ``capacity.py`` and ``grouped.py``.
    block_size: grouped mode: rows per block; each expert's rows are padded to multiples. 32:
      with the fused chunk loop on CPU, 16, 32 and 64 ran alike at E=16 and E=64, and 32 pads
      less than 64 (2.12 against 2.22 rows per token for top-2 at E=64, temporaries 372 against
      412 MiB); 16 adds more small chunks for less padding.
    matmul_backend: grouped mode: None (by platform) | 'blocks' | 'ragged_dot' | 'megablox'.
    drop_order: grouped mode: which selections an overflowing group drops first, 'rank'
      (later ranks, then later tokens) | 'weight' (smallest combine weight).
    renormalize: combine weights renormalised over the chosen experts; None picks the paper's
      choice (top-k renormalises, top-p uses raw probabilities).
    decode_tokens: calls of at most this many tokens take the decode path, which reads only
      the experts some token of the call selected (``decode.py``); None = the rule of
      ``auto_decode_tokens``, 0 = never. Only where the dispatch could drop nothing either.
    """

    num_experts: int
    d_model: int
    d_ff: int
    router: Router = Router.TOP_P
    threshold: float = 0.4
    top_k: int = 2
    max_k: int | None = None
    capacity_factor: float | None = 1.25
    expected_k: float = 2.0
    group_size: int | None = None
    dispatch: Dispatch = Dispatch.GROUPED
    renormalize: bool | None = None
    block_size: int = 32
    matmul_backend: Backend | None = None
    drop_order: DropOrder = DropOrder.RANK
    decode_tokens: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("router", enum_value(Router, "moe.router", self.router))
        if self.dispatch == "dropless":
            invalid("moe.dispatch", self.dispatch, "'grouped' (it replaces 'dropless'), "
                    "'index' or 'einsum'")  # fmt: skip
        set_("dispatch", enum_value(Dispatch, "moe.dispatch", self.dispatch))
        set_("drop_order", enum_value(DropOrder, "moe.drop_order", self.drop_order))
        if self.matmul_backend is not None:
            set_("matmul_backend", enum_value(Backend, "moe.matmul_backend", self.matmul_backend))
        bs = self.block_size
        check(is_int(bs) and bs >= 1, "moe.block_size", bs, "an integer >= 1")
        n = self.num_experts
        check(is_int(n) and n >= 1, "moe.num_experts", n, "an integer >= 1")
        for field in ("d_model", "d_ff"):
            v = getattr(self, field)
            check(is_int(v) and v >= 1, f"moe.{field}", v, "an integer >= 1")
        check(0.0 < self.threshold <= 1.0, "moe.threshold", self.threshold, "0 < threshold <= 1")
        check(is_int(self.top_k) and 1 <= self.top_k <= n, "moe.top_k", self.top_k, f"1..{n}")
        mk = self.max_k
        check(mk is None or (is_int(mk) and 1 <= mk <= n), "moe.max_k", mk, f"None or 1..{n}")
        cf = self.capacity_factor
        check(cf is None or cf > 0, "moe.capacity_factor", cf, "None (no dropping) or > 0")
        ek = self.expected_k
        check(0 < ek <= n, "moe.expected_k", ek, f"0 < expected_k <= {n}")
        gs = self.group_size
        check(gs is None or (is_int(gs) and gs >= 1), "moe.group_size", gs, "None or >= 1")
        dt = self.decode_tokens
        allowed = "None (by the rule) or an integer >= 0 (0 = never)"
        check(dt is None or (is_int(dt) and dt >= 0), "moe.decode_tokens", dt, allowed)

    @property
    def capacity_k(self) -> float:
        """The number of experts per token that capacity is sized for."""
        return float(self.top_k) if self.router is Router.TOP_K else self.expected_k

    def capacity(self, group_size: int) -> int:
        return capacity_lib.capacity(
            group_size, self.num_experts, self.capacity_k, self.capacity_factor
        )

    def budget(self, group_size: int) -> int:
        """Grouped mode: selections one group may keep (``grouped.budget``)."""
        return grouped.budget(
            group_size, self.capacity_k, self.capacity_factor, self.max_selections
        )

    def can_drop(self, group_size: int) -> bool:
        """Whether the configured dispatch could drop a selection in groups of this size."""
        if self.dispatch is Dispatch.GROUPED:
            return self.budget(group_size) < group_size * self.max_selections
        return self.capacity(group_size) < group_size

    @property
    def auto_decode_tokens(self) -> int:
        """The most tokens a call may have for the decode path when ``decode_tokens`` is None.

        The decode path runs each of the call's N tokens through each of the u = min(E,
        ceil(N * k)) experts it may select (k: ``capacity_k``); the grouped buffer computes
        about N * k rows plus up to one block of padding per expert in use. The rule: the
        largest N with N * u <= N * k + u * block_size. Every N up to the block size passes.
        """
        e, k, block = self.num_experts, self.capacity_k, self.block_size
        n = 1
        while n < e * block:
            u = min(e, math.ceil((n + 1) * k))
            if (n + 1) * u > (n + 1) * k + u * block:
                break
            n += 1
        return n

    def takes_decode_path(self, num_tokens: int, group_size: int) -> bool:
        """Whether a call of ``num_tokens`` tokens in groups of ``group_size`` reads only the
        experts its tokens selected: few enough tokens, and nothing the dispatch could drop."""
        limit = self.auto_decode_tokens if self.decode_tokens is None else self.decode_tokens
        return num_tokens <= limit and not self.can_drop(group_size)

    @property
    def max_selections(self) -> int:
        """A static bound K on the experts one token selects; it sizes the priority list.

        top-p selects rank r only while the r more probable experts hold less than the
        threshold; they hold at least r/E of the mass, so r < threshold * E. The 1e-3 covers
        float32 rounding of the cumulative sum (a few ulp per expert).
        """
        if self.router is Router.TOP_K:
            return self.top_k
        bound = math.ceil(self.num_experts * (self.threshold + 1e-3))
        return min(self.max_k or self.num_experts, bound)
