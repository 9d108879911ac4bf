"""MoELayer: a router and E SwiGLU experts, with per-expert capacity or a group budget, in NNX.

Axis letters: B batch, T sequence, D model width, F expert hidden width, E experts, G groups,
S tokens per group, C capacity (slots per expert per group), R rows of the grouped buffer,
P priority-list entries of a group.

Data flow (capacity modes): x_BTD -> x_GSD -> router logits_GSE (float32) -> Routing (mask,
rank, weights) -> slots per group -> x_EGCD -> SwiGLU experts -> y_EGCD -> y_GSD -> y_BTD.
The dispatched buffer is expert-major and the experts see it as [E, G*C, D]: one matmul per
expert over its slots of every group. XLA on CPU ran the 4-D [G, E, C, D] form about 2x slower.
Grouped: x_GSD -> each group's kept selections (its budget) -> one buffer x_RD sorted by
expert, block-padded -> grouped matmuls -> y_GSD; expert-parallel under a mesh with an
``expert`` axis (``expert_parallel.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import decode_experts, expert_parallel, experts, grouped, routing
from dynmoe_jax import dispatch as dispatch_lib
from dynmoe_jax.dispatch import Dispatch, DropOrder
from dynmoe_jax.grouped_matmul import Backend
from dynmoe_jax.routing import Router
from dynmoe_jax.sharding import constrain
from dynmoe_jax.validation import check, enum_value, invalid, is_int

# Logical layouts of the activations (sharding.LOGICAL_AXIS_RULES maps them to the mesh).
GROUPED = ("groups", None, "embed")
DISPATCHED = ("expert", "expert_groups", "capacity", "embed")


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
      capacity); see dispatch.py and grouped.py.
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
      the experts some token of the call selected (``decode_experts.py``); None = the rule of
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
        return dispatch_lib.capacity(
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


def _param(rngs: nnx.Rngs, init, shape, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    # Logical axis names travel as metadata; sharding.py maps them to mesh axes.
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


def _expert_init(in_axis: int, out_axis: int):
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=(0,)
    )


class MoELayer(nnx.Module):
    """Top-p / top-k Mixture-of-Experts feed-forward layer, grouped or per-expert capacity.

    Call on x [B, T, D]; returns (y [B, T, D], aux) where aux holds the named auxiliary losses
    (``load_balance_loss``, ``dynamic_loss``, ``z_loss``) and routing metrics: scalars over all
    tokens, ``expert_load`` [E] and ``token_experts`` [B, T] (experts selected per token).
    """

    def __init__(self, *, rngs: nnx.Rngs, **kwargs):
        self.config = cfg = kwargs.pop("config", None) or MoEConfig(**kwargs)
        e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        router_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.router_DE = _param(rngs, router_init, (d, e), ("embed", None))
        self.w_gate_EDF = _param(rngs, _expert_init(1, 2), (e, d, f), ("expert", "embed", "mlp"))
        self.w_up_EDF = _param(rngs, _expert_init(1, 2), (e, d, f), ("expert", "embed", "mlp"))
        self.w_down_EFD = _param(rngs, _expert_init(1, 2), (e, f, d), ("expert", "mlp", "embed"))

    def router_logits(self, x_GSD: jax.Array) -> jax.Array:
        """Router logits in float32 whatever the activation dtype."""
        x_TD = x_GSD.reshape(-1, x_GSD.shape[-1]).astype(jnp.float32)  # 2-D: see experts()
        return (x_TD @ self.router_DE[...]).reshape(x_GSD.shape[:-1] + (-1,))

    def expert_weights(self) -> experts.ExpertWeights:
        """(gate, up, down) in either layout (``experts.py``), unconverted."""
        return tuple(getattr(self, name).get_value() for name in experts.NAMES)

    def split_experts(self) -> None:
        """Puts the expert weights in the per-expert decode layout, in the compute dtype
        (``experts.py``): for inference only, made once, outside ``jit``."""
        split = experts.split_weights(self.expert_weights(), self.config.dtype)
        for name, weight in zip(experts.NAMES, split, strict=True):
            getattr(self, name).set_value(weight)

    def experts(self, x_EXD: jax.Array) -> jax.Array:
        """SwiGLU of every expert on its own rows: x [E, ..., D] -> [E, ..., D]."""
        dt = self.config.dtype
        # One row axis N: XLA on CPU ran [E, G, C, D] x [E, D, F] (and [B, T, D] x [D, F])
        # about 2x slower than the same matmul written [E, N, D] x [E, D, F] ([T, D] x [D, F]).
        x_END = x_EXD.reshape(x_EXD.shape[0], -1, x_EXD.shape[-1]).astype(dt)
        weights = experts.cast(self.expert_weights(), dt)
        return experts.per_expert_swiglu(x_END, weights).reshape(x_EXD.shape)

    def __call__(
        self, x_BTD: jax.Array, valid_BT: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``valid_BT``: the tokens that count (None: all). A padding token selects no expert,
        takes no capacity and is left out of the aux losses and metrics; its output is 0."""
        cfg = self.config
        b, t, d = x_BTD.shape
        s = _group_size(cfg.group_size, b, t)
        x_GSD = constrain(x_BTD.reshape(-1, s, d).astype(cfg.dtype), GROUPED)
        valid_GS = None if valid_BT is None else valid_BT.reshape(-1, s)

        logits_GSE, probs_GSE, r = self.route(x_GSD, valid_GS)
        if cfg.takes_decode_path(b * t, s):
            y_GSD, kept, slots_per_token = self._selected(x_GSD, r)
        elif cfg.dispatch is Dispatch.GROUPED:
            y_GSD, kept, slots_per_token = self._grouped(x_GSD, r)
        else:
            y_GSD, kept, slots_per_token = self._with_capacity(x_GSD, r)

        aux = _routing_metrics(logits_GSE, probs_GSE, r, kept, slots_per_token, valid_GS)
        aux["token_experts"] = jnp.sum(r.mask, axis=-1, dtype=jnp.int32).reshape(b, t)
        return y_GSD.reshape(b, t, d).astype(x_BTD.dtype), aux

    def route(
        self, x_GSD: jax.Array, valid_GS: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, routing.Routing]:
        """(router logits, probabilities, routing) of every token, in float32; tokens not
        ``valid`` select nothing."""
        cfg = self.config
        logits_GSE = self.router_logits(x_GSD)
        probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
        r = routing.route(
            probs_GSE,
            cfg.router,
            threshold=cfg.threshold,
            top_k=cfg.top_k,
            max_k=cfg.max_k,
            renormalize=cfg.renormalize,
        )
        if valid_GS is not None:
            keep_GS1 = valid_GS[..., None]
            r = r._replace(mask=r.mask & keep_GS1, weights=jnp.where(keep_GS1, r.weights, 0.0))
        return logits_GSE, probs_GSE, r

    def grouped_selections(self, r: routing.Routing, group_size: int) -> grouped.Selections:
        """Grouped mode: each group's selections kept under its budget (fields [G, P])."""
        cfg = self.config
        select = functools.partial(grouped.select, budget=cfg.budget(group_size),
                                   num_ranks=cfg.max_selections, order=cfg.drop_order)  # fmt: skip
        return jax.vmap(select)(r.mask, r.rank, r.weights)

    def _with_capacity(self, x_GSD: jax.Array, r: routing.Routing) -> tuple:
        """Fixed capacity per group: returns (y_GSD, kept selections, slots per token)."""
        cfg = self.config
        num_tokens, num_experts = x_GSD.shape[1], cfg.num_experts
        num_slots = cfg.capacity(num_tokens)
        assign = functools.partial(
            dispatch_lib.assign_slots, num_slots=num_slots, num_ranks=cfg.max_selections
        )
        slots = jax.vmap(assign)(r.mask, r.rank)
        fns = dispatch_lib.DISPATCH_FNS[cfg.dispatch]
        dispatch = jax.vmap(fns.dispatch, in_axes=(0, 0, None), out_axes=1)
        # Groups spread over every device -> experts over `expert`: XLA emits an all-to-all.
        x_EGCD = constrain(dispatch(x_GSD, slots, num_slots), DISPATCHED)
        y_EGCD = constrain(self.experts(x_EGCD), DISPATCHED)
        combine = jax.vmap(fns.combine, in_axes=(1, 0, 0, None))
        y_GSD = constrain(combine(y_EGCD, r.weights, slots, num_slots), GROUPED)
        kept = jnp.sum(slots.valid_EC, dtype=jnp.float32)
        return y_GSD, kept, jnp.float32(num_experts * num_slots / num_tokens)

    def _selected(self, x_GSD: jax.Array, r: routing.Routing) -> tuple:
        """The decode path: only the experts some token selected, every token through each;
        returns (y_GSD, kept selections, expert rows computed per token)."""
        cfg = self.config
        g, s, d = x_GSD.shape
        n, e = g * s, cfg.num_experts
        x_ND = x_GSD.reshape(n, d)
        mask_NE, weights_NE = r.mask.reshape(n, e), r.weights.reshape(n, e)
        weights = experts.cast(self.expert_weights(), cfg.dtype)
        max_used = min(e, n * cfg.max_selections)
        mesh = jax.sharding.get_abstract_mesh()
        if expert_parallel.expert_axis_size(mesh) > 1 and not experts.is_split(weights[0]):
            fn = functools.partial(expert_parallel.selected_experts, mesh)
        else:
            fn = decode_experts.selected_experts
        y_ND, used = fn(x_ND, mask_NE, weights_NE, weights, max_used)
        kept = jnp.sum(r.mask, dtype=jnp.float32)
        return y_ND.reshape(g, s, d), kept, used.astype(jnp.float32)

    def _grouped(self, x_GSD: jax.Array, r: routing.Routing) -> tuple:
        """One budget per group, every group's kept selections in one block-padded buffer
        sorted by expert, grouped matmuls; a ring of experts under an ``expert`` mesh axis."""
        cfg = self.config
        g, s, _ = x_GSD.shape
        budget = cfg.budget(s)
        sel = self.grouped_selections(r, s)
        weights = self.expert_weights()
        kw = {"budget": budget, "block_size": cfg.block_size, "backend": cfg.matmul_backend}
        mesh = jax.sharding.get_abstract_mesh()
        if expert_parallel.expert_axis_size(mesh) > 1:
            _check_groups_fit(mesh, g, cfg.group_size)
            weights = experts.stacked_weights(weights)  # sharded over `expert`
            y_GSD, rows = expert_parallel.ring_experts(mesh, x_GSD, sel, weights, **kw)
        else:
            y_GSD, rows = grouped.experts_on_selections(x_GSD, sel, weights, expert_offset=0, **kw)
        kept = jnp.sum(sel.expert_P < cfg.num_experts, dtype=jnp.float32)
        return constrain(y_GSD, GROUPED), kept, rows / (g * s)


def _check_groups_fit(mesh, num_groups: int, group_size: int | None) -> None:
    devices = math.prod(mesh.shape[a] for a in ("data", "expert") if a in mesh.axis_names)
    if num_groups % devices:
        invalid("moe.group_size", group_size,
                f"a size giving a multiple of data x expert = {devices} routing groups "
                f"(it gives {num_groups})")  # fmt: skip


def _group_size(group_size: int | None, batch: int, seq_len: int) -> int:
    """Tokens per routing group: one sequence by default, else ``group_size`` tokens (at most
    every token of the call, so short calls such as decoding still form one group)."""
    if group_size is None:
        return seq_len
    num_tokens = batch * seq_len
    s = min(group_size, num_tokens)
    if num_tokens % s:
        allowed = f"a divisor of the tokens of one call (batch * seq_len = {batch} * {seq_len})"
        invalid("moe.group_size", group_size, allowed)
    return s


def _routing_metrics(logits, probs, r: routing.Routing, kept, slots_per_token, valid) -> dict:
    """Named aux losses and routing statistics of one layer call: means over the valid
    tokens (all when ``valid`` is None).

    kept: selections that were computed; slots_per_token: expert rows computed per token
    (E*C/S with capacity; grouped: rows in use, block padding included, per token).
    """
    num_experts = probs.shape[-1]
    mask_f = r.mask.astype(jnp.float32)
    per_token = jnp.sum(mask_f, axis=-1)
    total = jnp.sum(per_token)
    selections = jnp.maximum(total, 1.0)  # 0 only when every token is padding
    counts = jnp.ones_like(per_token, bool) if valid is None else valid
    mean = lambda x: routing.token_mean(x[..., None], valid)[0]  # noqa: E731
    return {
        "load_balance_loss": routing.load_balance_loss(probs, r.mask, valid),
        "dynamic_loss": routing.dynamic_loss(logits, valid),
        "z_loss": routing.z_loss(logits, valid),
        "experts_per_token": mean(per_token),
        "experts_per_token_max": jnp.max(jnp.where(counts, per_token, 0.0)),
        "experts_per_token_min": jnp.min(jnp.where(counts, per_token, num_experts)),
        "slots_per_token": jnp.asarray(slots_per_token, jnp.float32),
        "dropped_fraction": (total - kept) / selections,
        "expert_load": jnp.sum(mask_f.reshape(-1, num_experts), axis=0) / selections,
        "router_confidence": mean(jnp.max(probs, axis=-1)),
    }
