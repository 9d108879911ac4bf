"""MoELayer: a router and E SwiGLU experts, with fixed capacity or dropless, in Flax NNX.

Axis letters: B batch, T sequence, D model width, F expert hidden width, E experts, G groups,
S tokens per group, C capacity (slots per expert per group), M rows of the dropless buffer.

Data flow (capacity modes): x_BTD -> x_GSD -> router logits_GSE (float32) -> Routing (mask,
rank, weights) -> slots per group -> x_EGCD -> SwiGLU experts -> y_EGCD -> y_GSD -> y_BTD.
The dispatched buffer is expert-major and the experts see it as [E, G*C, D]: one matmul per
expert over its slots of every group. XLA on CPU ran the 4-D [G, E, C, D] form about 2x slower.
Dropless: x_GSD -> rows of every selection sorted by expert x_MD -> grouped matmuls -> y_GSD.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import dispatch as dispatch_lib
from dynmoe_jax import routing
from dynmoe_jax.dispatch import Dispatch
from dynmoe_jax.routing import Router
from dynmoe_jax.sharding import constrain
from dynmoe_jax.validation import check, enum_value, is_int

# Logical layouts of the activations (sharding.LOGICAL_AXIS_RULES maps them to the mesh).
GROUPED = ("groups", None, "embed")
DISPATCHED = ("expert", "expert_groups", "capacity", "embed")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of one MoE layer; validated on construction, before any tracing.

    capacity_factor: None means no dropping (capacity = group size).
    expected_k: mean experts per token that top-p's capacity is sized for (top-k uses k).
    group_size: tokens per routing group (None: one group per sequence).
    dispatch: 'index' | 'einsum' (fixed capacity) | 'dropless' (every selection computed;
      capacity_factor and expected_k do not apply); see dispatch.py.
    renormalize: combine weights renormalised over the chosen experts; None picks the paper's
      choice (top-k renormalises, top-p uses raw probabilities).
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
    dispatch: Dispatch = Dispatch.INDEX
    renormalize: bool | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("router", enum_value(Router, "moe.router", self.router))
        set_("dispatch", enum_value(Dispatch, "moe.dispatch", self.dispatch))
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

    @property
    def capacity_k(self) -> float:
        """The number of experts per token that capacity is sized for."""
        return float(self.top_k) if self.router is Router.TOP_K else self.expected_k

    def capacity(self, group_size: int) -> int:
        return dispatch_lib.capacity(
            group_size, self.num_experts, self.capacity_k, self.capacity_factor
        )

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
    """Top-p / top-k Mixture-of-Experts feed-forward layer, fixed capacity or dropless.

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

    def experts(self, x_EXD: jax.Array) -> jax.Array:
        """SwiGLU of every expert on its own rows: x [E, ..., D] -> [E, ..., D]."""
        dt = self.config.dtype
        # One row axis N: XLA on CPU ran [E, G, C, D] x [E, D, F] (and [B, T, D] x [D, F])
        # about 2x slower than the same matmul written [E, N, D] x [E, D, F] ([T, D] x [D, F]).
        x_END = x_EXD.reshape(x_EXD.shape[0], -1, x_EXD.shape[-1]).astype(dt)
        gate_ENF = jnp.einsum("END,EDF->ENF", x_END, self.w_gate_EDF[...].astype(dt))
        up_ENF = jnp.einsum("END,EDF->ENF", x_END, self.w_up_EDF[...].astype(dt))
        h_ENF = jax.nn.silu(gate_ENF) * up_ENF
        y_END = jnp.einsum("ENF,EFD->END", h_ENF, self.w_down_EFD[...].astype(dt))
        return y_END.reshape(x_EXD.shape)

    def ragged_experts(self, x_MD: jax.Array, counts_E: jax.Array) -> jax.Array:
        """SwiGLU on rows sorted by expert, ``counts_E`` rows each, as grouped matmuls."""
        dt = self.config.dtype
        e, d, f = self.w_gate_EDF.shape
        # One grouped matmul for gate and up: on CPU ragged_dot copies its [M, D] input once
        # per expert ([E, M, D]), so a shared call halves that copy and its backward's.
        w_gate_up = jnp.stack([self.w_gate_EDF[...], self.w_up_EDF[...]], axis=2)
        w_gate_up = w_gate_up.reshape(e, d, 2 * f).astype(dt)
        h_MKF = jax.lax.ragged_dot(x_MD.astype(dt), w_gate_up, counts_E).reshape(-1, 2, f)
        h = jax.nn.silu(h_MKF[:, 0]) * h_MKF[:, 1]
        return jax.lax.ragged_dot(h, self.w_down_EFD[...].astype(dt), counts_E)

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        b, t, d = x_BTD.shape
        s = _group_size(cfg.group_size, b, t)
        x_GSD = constrain(x_BTD.reshape(-1, s, d).astype(cfg.dtype), GROUPED)

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
        if cfg.dispatch is Dispatch.DROPLESS:
            y_GSD, kept, slots_per_token = self._dropless(x_GSD, r)
        else:
            y_GSD, kept, slots_per_token = self._with_capacity(x_GSD, r)

        aux = _routing_metrics(logits_GSE, probs_GSE, r, kept, slots_per_token)
        aux["token_experts"] = jnp.sum(r.mask, axis=-1, dtype=jnp.int32).reshape(b, t)
        return y_GSD.reshape(b, t, d).astype(x_BTD.dtype), aux

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

    def _dropless(self, x_GSD: jax.Array, r: routing.Routing) -> tuple:
        """Every selection computed: one sort by expert over all tokens (groups do not matter
        without capacity), grouped matmuls, then a weighted scatter-add back to the tokens.

        Not expert-parallel: under a mesh the sort spans every device's tokens, so XLA gathers
        them; the capacity modes are the ones laid out for expert parallelism.
        """
        cfg = self.config
        g, s, d = x_GSD.shape
        mask_TE, rank_TE, weights_TE = (a.reshape(g * s, -1) for a in r)
        key_M = dispatch_lib.priority_list(mask_TE, rank_TE, cfg.max_selections)
        by = dispatch_lib.sort_by_expert(key_M, cfg.num_experts)
        x_MD = dispatch_lib.dropless_dispatch(x_GSD.reshape(g * s, d), by)
        y_MD = self.ragged_experts(x_MD, by.counts_E)
        y_TD = dispatch_lib.dropless_combine(y_MD, weights_TE, by)
        kept = jnp.sum(by.counts_E, dtype=jnp.float32)
        return constrain(y_TD.reshape(g, s, d), GROUPED), kept, kept / (g * s)


def _group_size(group_size: int | None, batch: int, seq_len: int) -> int:
    """Tokens per routing group: one sequence by default, else ``group_size`` tokens (at most
    every token of the call, so short calls such as decoding still form one group)."""
    if group_size is None:
        return seq_len
    num_tokens = batch * seq_len
    s = min(group_size, num_tokens)
    if num_tokens % s:
        raise ValueError(
            f"moe.group_size={group_size} must divide the tokens of one call "
            f"(batch * seq_len = {batch} * {seq_len} = {num_tokens})"
        )
    return s


def _routing_metrics(logits, probs, r: routing.Routing, kept, slots_per_token) -> dict:
    """Named aux losses and routing statistics of one layer call (means over all tokens).

    kept: selections that were computed (all of them in dropless mode); slots_per_token:
    expert rows computed per token (E*C/S with capacity; experts per token when dropless).
    """
    num_experts = probs.shape[-1]
    mask_f = r.mask.astype(jnp.float32)
    per_token = jnp.sum(mask_f, axis=-1)
    selections = jnp.sum(per_token)
    return {
        "load_balance_loss": routing.load_balance_loss(probs, r.mask),
        "dynamic_loss": routing.dynamic_loss(logits),
        "z_loss": routing.z_loss(logits),
        "experts_per_token": jnp.mean(per_token),
        "experts_per_token_max": jnp.max(per_token),
        "experts_per_token_min": jnp.min(per_token),
        "slots_per_token": jnp.asarray(slots_per_token, jnp.float32),
        "dropped_fraction": 1.0 - kept / selections,
        "expert_load": jnp.sum(mask_f.reshape(-1, num_experts), axis=0) / selections,
        "router_confidence": jnp.mean(jnp.max(probs, axis=-1)),
    }
