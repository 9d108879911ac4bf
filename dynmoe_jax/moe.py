"""MoELayer: a router and E SwiGLU experts with fixed capacity, in Flax NNX.

Axis letters: B batch, T sequence, D model width, F expert hidden width, E experts, G groups,
S tokens per group, C capacity (slots per expert per group).

Data flow: x_BTD -> x_GSD -> router logits_GSE (float32) -> Routing (mask, rank, weights)
-> slots per group -> x_GECD -> SwiGLU experts -> y_GECD -> y_GSD -> y_BTD.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import dispatch as dispatch_lib
from dynmoe_jax import routing
from dynmoe_jax.dispatch import Dispatch
from dynmoe_jax.routing import Router
from dynmoe_jax.sharding import constrain

# Logical layouts of the activations (sharding.LOGICAL_AXIS_RULES maps them to the mesh).
GROUPED = ("groups", None, "embed")
DISPATCHED = ("expert_groups", "expert", "capacity", "embed")


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"moe.{field}={value!r} is invalid: allowed {allowed}")


def _enum_value(enum_cls, field: str, value):
    try:
        return enum_cls(value)
    except ValueError:
        allowed = " | ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"moe.{field}={value!r} is invalid: allowed {allowed}") from None


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of one MoE layer; validated on construction, before any tracing.

    capacity_factor: None means no dropping (capacity = group size).
    expected_k: mean experts per token that top-p's capacity is sized for (top-k uses k).
    group_size: tokens per routing group (None: one group per sequence).
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
        set_("router", _enum_value(Router, "router", self.router))
        set_("dispatch", _enum_value(Dispatch, "dispatch", self.dispatch))
        n = self.num_experts
        _check(_is_int(n) and n >= 1, "num_experts", n, "an integer >= 1")
        for field in ("d_model", "d_ff"):
            v = getattr(self, field)
            _check(_is_int(v) and v >= 1, field, v, "an integer >= 1")
        _check(0.0 < self.threshold <= 1.0, "threshold", self.threshold, "0 < threshold <= 1")
        _check(_is_int(self.top_k) and 1 <= self.top_k <= n, "top_k", self.top_k, f"1..{n}")
        mk = self.max_k
        _check(mk is None or (_is_int(mk) and 1 <= mk <= n), "max_k", mk, f"None or 1..{n}")
        cf = self.capacity_factor
        _check(cf is None or cf > 0, "capacity_factor", cf, "None (no dropping) or > 0")
        ek = self.expected_k
        _check(0 < ek <= n, "expected_k", ek, f"0 < expected_k <= {n}")
        gs = self.group_size
        _check(gs is None or (_is_int(gs) and gs >= 1), "group_size", gs, "None or >= 1")

    @property
    def capacity_k(self) -> float:
        """The number of experts per token that capacity is sized for."""
        return float(self.top_k) if self.router is Router.TOP_K else self.expected_k

    def capacity(self, group_size: int) -> int:
        return dispatch_lib.capacity(
            group_size, self.num_experts, self.capacity_k, self.capacity_factor
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _param(rngs: nnx.Rngs, init, shape, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    # Logical axis names travel as metadata; sharding.py maps them to mesh axes.
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


def _expert_init(in_axis: int, out_axis: int):
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis, batch_axis=(0,)
    )


class MoELayer(nnx.Module):
    """Top-p / top-k Mixture-of-Experts feed-forward layer with fixed expert capacity.

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
        return jnp.einsum("GSD,DE->GSE", x_GSD.astype(jnp.float32), self.router_DE[...])

    def experts(self, x_GECD: jax.Array) -> jax.Array:
        """SwiGLU of every expert on its own slots."""
        dt = self.config.dtype
        x = x_GECD.astype(dt)
        gate = jnp.einsum("GECD,EDF->GECF", x, self.w_gate_EDF[...].astype(dt))
        up = jnp.einsum("GECD,EDF->GECF", x, self.w_up_EDF[...].astype(dt))
        return jnp.einsum("GECF,EFD->GECD", jax.nn.silu(gate) * up, self.w_down_EFD[...].astype(dt))

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        b, t, d = x_BTD.shape
        s = _group_size(cfg.group_size, b, t)
        num_slots = cfg.capacity(s)
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
        assign = functools.partial(dispatch_lib.assign_slots, num_slots=num_slots)
        slots = jax.vmap(assign)(r.mask, r.rank)
        fns = dispatch_lib.DISPATCH_FNS[cfg.dispatch]
        x_GECD = jax.vmap(fns.dispatch, in_axes=(0, 0, None))(x_GSD, slots, num_slots)
        # Groups spread over every device -> experts over `expert`: XLA emits an all-to-all.
        x_GECD = constrain(x_GECD, DISPATCHED)
        y_GECD = constrain(self.experts(x_GECD), DISPATCHED)
        y_GSD = jax.vmap(fns.combine, in_axes=(0, 0, 0, None))(y_GECD, r.weights, slots, num_slots)
        y_GSD = constrain(y_GSD, GROUPED)

        aux = _routing_metrics(logits_GSE, probs_GSE, r, slots, num_slots)
        aux["token_experts"] = jnp.sum(r.mask, axis=-1, dtype=jnp.int32).reshape(b, t)
        return y_GSD.reshape(b, t, d).astype(x_BTD.dtype), aux


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


def _routing_metrics(logits, probs, r: routing.Routing, slots, num_slots: int) -> dict:
    """Named aux losses and routing statistics of one layer call (means over all tokens)."""
    num_experts = probs.shape[-1]
    mask_f = r.mask.astype(jnp.float32)
    per_token = jnp.sum(mask_f, axis=-1)
    selections = jnp.sum(per_token)
    kept = jnp.sum(slots.kept_SE.astype(jnp.float32))
    tokens_per_group = probs.shape[-2]
    return {
        "load_balance_loss": routing.load_balance_loss(probs, r.mask),
        "dynamic_loss": routing.dynamic_loss(logits),
        "z_loss": routing.z_loss(logits),
        "experts_per_token": jnp.mean(per_token),
        "experts_per_token_max": jnp.max(per_token),
        "experts_per_token_min": jnp.min(per_token),
        "slots_per_token": jnp.asarray(num_experts * num_slots / tokens_per_group, jnp.float32),
        "dropped_fraction": 1.0 - kept / selections,
        "expert_load": jnp.sum(mask_f.reshape(-1, num_experts), axis=0) / selections,
        "router_confidence": jnp.mean(jnp.max(probs, axis=-1)),
    }
