"""MoEConfig: the hyper-parameters of one MoE layer, validated on construction, and the
dispatch modes.

Axis letters: S tokens per group, E experts, K ranks a token may select.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, ClassVar

import jax.numpy as jnp

from dynmoe_jax.validation import (
    Choice,
    Given,
    OrNone,
    PerLayer,
    Range,
    check_declared,
    declared,
)


class Router(str, enum.Enum):
    """Routing rules (``routing.py``). The string values are what configs and constructors
    accept."""

    TOP_P = "top_p"
    TOP_K = "top_k"


class Dispatch(str, enum.Enum):
    EINSUM = "einsum"
    INDEX = "index"
    GROUPED = "grouped"


class DropOrder(str, enum.Enum):
    """Which of a group's selections the grouped mode drops first when they exceed its budget."""

    RANK = "rank"  # the priority list's order: later ranks, then later tokens
    WEIGHT = "weight"  # the smallest combine weights


class Backend(str, enum.Enum):
    """The grouped matmul's implementation (``kernels/grouped_matmul.py``)."""

    BLOCKS = "blocks"
    RAGGED_DOT = "ragged_dot"
    TOKAMAX = "tokamax"


DTYPES = ("float32", "bfloat16")  # compute dtypes: activations and matmuls


def dtype_name(value: Any) -> str:
    """A compute dtype's canonical name (``jnp.bfloat16`` or ``'bfloat16'`` -> 'bfloat16')."""
    return jnp.dtype(value).name


DTYPE = Choice(DTYPES, canonical=dtype_name)  # a compute dtype, held by its name


def selections(group_size: int, k: float, capacity_factor: float) -> int:
    """The one sizing rule of every dispatch: a group of S tokens selecting k experts each is
    sized for ``ceil(capacity_factor * k * S)`` selections, at least 1."""
    return max(1, math.ceil(capacity_factor * k * group_size))


def capacity(
    group_size: int, num_experts: int, expected_k: float, capacity_factor: float | None
) -> int:
    """Slots per expert per group (index, einsum): the group's ``selections`` shared over the E
    experts, rounded up (``ceil(ceil(a) / E) = ceil(a / E)``), at most S (a token visits an
    expert at most once). ``None`` means no dropping."""
    if capacity_factor is None:
        return group_size
    per_expert = -(-selections(group_size, expected_k, capacity_factor) // num_experts)
    return min(group_size, per_expert)


def budget(group_size: int, k: float, capacity_factor: float | None, num_ranks: int) -> int:
    """Selections a group may keep (grouped): its ``selections``, at most the S * K entries of
    its priority list; ``None`` means S * K (nothing is ever dropped)."""
    entries = group_size * num_ranks
    if capacity_factor is None:
        return entries
    return min(entries, selections(group_size, k, capacity_factor))


_EXPERTS = Range(1, "num_experts")  # a count of this layer's experts
_AT_LEAST_1 = Range(1)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of one MoE layer; each field declared once (``validation.declared``),
    validated on construction, before any tracing."""

    SECTION: ClassVar[str] = "moe"
    num_experts: int = declared(8, "experts per MoE layer", _AT_LEAST_1)
    d_model: int = declared(256, "the layer's input and output width (from model.d_model)",
                            _AT_LEAST_1, cli=False)  # fmt: skip
    d_ff: int = declared(512, "hidden width of each expert", _AT_LEAST_1)
    router: Router = declared(
        Router.TOP_P, "top_p: each token takes experts until their probability reaches the "
        "threshold (the paper) | top_k: a fixed k", override=True,
    )  # fmt: skip
    threshold: float = declared(
        0.4, "top-p: the probability mass a token's experts must reach (the paper: 0.4)",
        Range(0, 1, integer=False, open_low=True), override=True,
    )  # fmt: skip
    top_k: int | tuple[int, ...] | None = declared(
        2, "top-k: experts per token, one k or one per MoE layer, lowest first (a "
        "heterogeneous model; not with model.scan_layers); None: an imported checkpoint's",
        OrNone(PerLayer(_EXPERTS), unless=("router", Router.TOP_K)),
        override=True,
    )  # fmt: skip
    max_k: int | None = declared(
        None, "top-p: at most this many experts per token (None: no cap, as in the paper)",
        OrNone(_EXPERTS), override=True,
    )  # fmt: skip
    capacity_factor: float | None = declared(
        1.25, "capacity (index, einsum) or budget (grouped) over k tokens' worth; None: nothing "
        "is ever dropped", OrNone(Range(0, integer=False, open_low=True), "no dropping"),
        override=True,
    )  # fmt: skip
    expected_k: float | None = declared(
        None, "the experts per token that top-p's capacity or budget is sized for (None: "
        "target_k when set, else 2; top-k: k)",
        OrNone(Range(0, "num_experts", integer=False, open_low=True)), override=True,
    )  # fmt: skip
    target_k: float | None = declared(
        None, "top-p: a target mean of experts per token; each layer's threshold is then "
        "state that a PI controller steers after every step (None: the fixed threshold)",
        OrNone(Given(Range(1, "num_experts", integer=False), "router", Router.TOP_P)),
        override=True,
    )  # fmt: skip
    bias_balance: float = declared(
        0.0, "aux-loss-free balancing: the step of a per-expert bias that moves experts in the "
        "order of selection, never in the combine weights (0 = off)",
        Range(0, integer=False), override=True,
    )  # fmt: skip
    group_size: int | None = declared(
        None, "tokens per routing group (None: one group per sequence)",
        OrNone(_AT_LEAST_1), override=True,
    )  # fmt: skip
    dispatch: Dispatch = declared(
        Dispatch.GROUPED, "grouped: one budget per group, any expert any share | index, "
        "einsum: per-expert capacity (capacity.py, grouped.py). A call with few tokens that "
        "could drop nothing takes the decode path instead, whatever the dispatch (see "
        "decode_tokens; 0 keeps this dispatch for every call)", override=True,
    )  # fmt: skip
    renormalize: bool | None = declared(
        None, "combine weights renormalised over the chosen experts (None: the paper's "
        "choice, top-k renormalises and top-p does not)", OrNone(Choice((True, False))),
        override=True,
    )  # fmt: skip
    block_size: int = declared(
        32, "grouped: rows per block of the grouped matmul (each expert's rows are padded to "
        "a multiple)", _AT_LEAST_1, override=True,
    )  # fmt: skip
    matmul_backend: Backend | None = declared(
        None, "grouped: None (by platform: tokamax on TPU and on GPUs of compute capability "
        ">= 8, ragged_dot there without tokamax, blocks elsewhere) | blocks (the fused CPU "
        "loop) | ragged_dot (jax.lax.ragged_dot) | tokamax (docs/accelerators.md)",
        override=True,
    )  # fmt: skip
    drop_order: DropOrder = declared(
        DropOrder.RANK, "grouped: what an overflowing group drops first: rank (later ranks, "
        "then later tokens) | weight (the smallest combine weights)", override=True,
    )  # fmt: skip
    decode_tokens: int | None = declared(
        None, "calls of at most this many tokens take the decode path (only the experts some "
        "token selected); None: by the rule of auto_decode_tokens, 0: never",
        OrNone(Range(0, note="0 = never"), "by the rule"), override=True,
    )  # fmt: skip
    decode_kernel: bool = declared(
        True, "on CPU, the decode path runs each expert of the decode layout through the "
        "project's kernel, on only the tokens that selected it (built with the system C++ "
        "compiler on first use; without one, or False: XLA's forms)", Choice((True, False)),
        override=True,
    )  # fmt: skip
    dtype: str = declared("float32", "activations and expert matmuls (from model.dtype)",
                          DTYPE, cli=False)  # fmt: skip

    def __post_init__(self):
        check_declared(self)

    @property
    def per_layer(self) -> bool:
        """Whether ``top_k`` holds one k per MoE layer (see ``layer``)."""
        return isinstance(self.top_k, tuple)

    def layer(self, index: int) -> MoEConfig:
        """The config of MoE layer ``index`` (0 = lowest): its own k where ``top_k`` holds one
        per layer, else this config."""
        if not self.per_layer:
            return self
        return dataclasses.replace(self, top_k=self.top_k[index])

    @property
    def capacity_k(self) -> float:
        """The number of experts per token that capacity is sized for (with one k per layer,
        their mean: a model-wide figure; each layer's own config sizes that layer)."""
        if self.router is Router.TOP_K:
            return sum(self.top_k) / len(self.top_k) if self.per_layer else float(self.top_k)
        if self.expected_k is not None:
            return self.expected_k
        return 2.0 if self.target_k is None else float(self.target_k)

    def capacity(self, group_size: int) -> int:
        return capacity(group_size, self.num_experts, self.capacity_k, self.capacity_factor)

    def budget(self, group_size: int) -> int:
        """Grouped mode: selections one group may keep (``budget``)."""
        return budget(group_size, self.capacity_k, self.capacity_factor, self.max_selections)

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
        float32 rounding of the cumulative sum (a few ulp per expert). With a steered threshold
        or a biased order the bound is E (or max_k).
        """
        if self.router is Router.TOP_K:
            return max(self.top_k) if self.per_layer else self.top_k
        cap = self.max_k or self.num_experts
        if self.target_k is not None or self.bias_balance:
            return cap  # a steered threshold, or an order that is not by probability
        return min(cap, math.ceil(self.num_experts * (self.threshold + 1e-3)))
