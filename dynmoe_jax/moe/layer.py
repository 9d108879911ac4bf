"""MoELayer: a router and E SwiGLU experts, with per-expert capacity or a group budget, in NNX.

Axis letters: B batch, T sequence, D model width, F expert hidden width, E experts, G groups,
S tokens per group, M all tokens of the call, C capacity (slots per expert per group), R rows
of the grouped buffer, P priority-list entries of a group, A any axes.

Data flow (capacity modes): x_BTD -> x_GSD -> router logits_GSE (float32) -> Routing (mask,
rank, weights) -> slots per group -> x_EGCD -> SwiGLU experts -> y_EGCD -> y_GSD -> y_BTD.
The dispatched buffer is expert-major and the experts see it as [E, G*C, D]: one matmul per
expert over its slots of every group (XLA on CPU ran the 4-D [G, E, C, D] form slower).
Grouped: x_GSD -> each group's kept selections (its budget) -> one buffer x_RD sorted by
expert, block-padded -> grouped matmuls -> y_GSD; expert-parallel under a mesh with an
``expert`` axis (``expert_parallel.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax.moe import balance, decode, expert_parallel, experts, grouped, metrics, routing
from dynmoe_jax.moe import capacity as capacity_lib
from dynmoe_jax.moe.balance import RoutingState
from dynmoe_jax.moe.config import Dispatch, MoEConfig
from dynmoe_jax.moe.kernels import cpu_swiglu
from dynmoe_jax.sharding import constrain
from dynmoe_jax.validation import invalid

# Logical layouts of the activations (sharding.LOGICAL_AXIS_RULES maps them to the mesh).
GROUPED = ("groups", None, "embed")


DISPATCHED = ("expert", "expert_groups", "capacity", "embed")


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

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoELayer takes a MoEConfig; got {type(config).__name__} "
                            "(write MoELayer(MoEConfig(d_model=..., ...), rngs=...))")  # fmt: skip
        if config.per_layer:
            raise TypeError(f"MoELayer takes one layer's config; moe.top_k={config.top_k} "
                            "holds one k per layer (pass config.layer(i))")  # fmt: skip
        self.config = cfg = config
        e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
        router_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.router_DE = _param(rngs, router_init, (d, e), ("embed", None))
        self.w_gate_EDF = _param(rngs, _expert_init(1, 2), (e, d, f), ("expert", "embed", "mlp"))
        self.w_up_EDF = _param(rngs, _expert_init(1, 2), (e, d, f), ("expert", "embed", "mlp"))
        self.w_down_EFD = _param(rngs, _expert_init(1, 2), (e, f, d), ("expert", "mlp", "embed"))
        # Routing state that the rules of balance.py update after each step (not trained).
        state = {}
        if cfg.target_k is not None:
            state.update(router_threshold=(), router_integral=())
        if cfg.bias_balance:
            state.update(router_bias_E=(e,))
        for name, shape in state.items():
            value = balance.initial(name, cfg, shape)
            setattr(self, name, RoutingState(value, logical_axes=(None,) * len(shape)))

    def threshold(self) -> jax.Array | float:
        """Top-p's threshold: the controller's state when a target is set, else the config's."""
        if self.config.target_k is None:
            return self.config.threshold
        return jax.lax.stop_gradient(self.router_threshold[...])

    def selection_bias(self) -> jax.Array | None:
        """The per-expert bias of the order of selection (None without bias balance)."""
        if not self.config.bias_balance:
            return None
        return jax.lax.stop_gradient(self.router_bias_E[...])

    def update_routing(self, k: jax.Array, load_E: jax.Array) -> None:
        """After a step: the controller and the bias balance from the step's mean experts per
        token ``k`` and expert load ``load_E`` of this layer ([] and [E]; with a leading axis
        for a scanned layer's stack)."""
        cfg = self.config
        if cfg.target_k is not None:
            new, integral = balance.threshold_step(self.router_threshold[...],
                                                   self.router_integral[...], k, cfg.target_k,
                                                   cfg.threshold)  # fmt: skip
            self.router_threshold.set_value(new)
            self.router_integral.set_value(integral)
        if cfg.bias_balance:
            self.router_bias_E.set_value(
                balance.bias_step(self.router_bias_E[...], load_E, cfg.bias_balance)
            )

    def router_logits(self, x_GSD: jax.Array) -> jax.Array:
        """Router logits in float32 whatever the activation dtype."""
        x_MD = x_GSD.reshape(-1, x_GSD.shape[-1]).astype(jnp.float32)  # 2-D: see experts()
        return (x_MD @ self.router_DE[...]).reshape(x_GSD.shape[:-1] + (-1,))

    def expert_weights(self) -> experts.ExpertWeights:
        """(gate, up, down) in either layout (``experts.py``), unconverted."""
        return tuple(getattr(self, name).get_value() for name in experts.NAMES)

    def split_experts(self, dtype: Any = None) -> None:
        """Puts the expert weights in the per-expert decode layout, in ``dtype`` (default: the
        compute dtype; ``experts.py``): for inference only, made once, outside ``jit``."""
        split = experts.split_weights(self.expert_weights(), dtype or self.config.dtype)
        for name, weight in zip(experts.NAMES, split, strict=True):
            getattr(self, name).set_value(weight)

    def experts(self, x_EAD: jax.Array) -> jax.Array:
        """SwiGLU of every expert on its own rows: x [E, ..., D] -> [E, ..., D]."""
        dt = self.config.dtype
        # One row axis: XLA on CPU ran [E, G, C, D] x [E, D, F] (and [B, T, D] x [D, F])
        # slower than the same matmul written [E, G*C, D] x [E, D, F] ([M, D] x [D, F]).
        rows_EAD = x_EAD.reshape(x_EAD.shape[0], -1, x_EAD.shape[-1]).astype(dt)
        weights = experts.cast(self.expert_weights(), dt)
        return experts.per_expert_swiglu(rows_EAD, weights).reshape(x_EAD.shape)

    def __call__(
        self, x_BTD: jax.Array, valid_BT: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``valid_BT``: the tokens that count (None: all). A padding token selects no expert,
        takes no capacity and is left out of the aux losses and metrics; its output is 0."""
        cfg = self.config
        _check_input(x_BTD.shape, valid_BT, cfg.d_model)
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

        aux = metrics.routing_metrics(logits_GSE, probs_GSE, r, kept, slots_per_token, valid_GS)
        aux["token_experts"] = jnp.sum(r.mask, axis=-1, dtype=jnp.int32).reshape(b, t)
        aux["threshold"] = jnp.asarray(self.threshold(), jnp.float32)
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
            threshold=self.threshold(),
            top_k=cfg.top_k,
            max_k=cfg.max_k,
            renormalize=cfg.renormalize,
            bias=self.selection_bias(),
        )
        if valid_GS is not None:
            keep_GS1 = valid_GS[..., None]
            r = r._replace(mask=r.mask & keep_GS1, weights=jnp.where(keep_GS1, r.weights, 0.0))
        return logits_GSE, probs_GSE, r

    def _with_capacity(self, x_GSD: jax.Array, r: routing.Routing) -> tuple:
        """Fixed capacity per group: returns (y_GSD, kept selections, slots per token)."""
        cfg = self.config
        num_tokens, num_experts = x_GSD.shape[1], cfg.num_experts
        num_slots = cfg.capacity(num_tokens)
        assign = functools.partial(
            capacity_lib.assign_slots, num_slots=num_slots, num_ranks=cfg.max_selections
        )
        slots = jax.vmap(assign)(r.mask, r.rank)
        fns = capacity_lib.DISPATCH_FNS[cfg.dispatch]
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
        x_MD = x_GSD.reshape(n, d)
        mask_ME, weights_ME = r.mask.reshape(n, e), r.weights.reshape(n, e)
        weights = self.expert_weights()
        kernel = _takes_kernel(cfg, weights)
        if not kernel:  # the kernel reads float32 and bfloat16 weights as they are
            weights = experts.cast(weights, cfg.dtype)
        max_used = min(e, n * cfg.max_selections)
        mesh = jax.sharding.get_abstract_mesh()
        if expert_parallel.expert_axis_size(mesh) > 1 and not experts.is_split(weights[0]):
            fn = functools.partial(expert_parallel.selected_experts, mesh)
        else:
            fn = functools.partial(decode.selected_experts, kernel=kernel)
        y_MD, used = fn(x_MD, mask_ME, weights_ME, weights, max_used)
        kept = jnp.sum(r.mask, dtype=jnp.float32)
        return y_MD.reshape(g, s, d), kept, used.astype(jnp.float32)

    def _grouped(self, x_GSD: jax.Array, r: routing.Routing) -> tuple:
        """One budget per group, every group's kept selections in one block-padded buffer
        sorted by expert, grouped matmuls; a ring of experts under an ``expert`` mesh axis."""
        cfg = self.config
        g, s, _ = x_GSD.shape
        budget = cfg.budget(s)
        sel = grouped.select_groups(r.mask, r.rank, r.weights, budget=budget,
                                    num_ranks=cfg.max_selections, order=cfg.drop_order)  # fmt: skip
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


def _takes_kernel(cfg: MoEConfig, weights: experts.ExpertWeights) -> bool:
    """Whether the decode path runs these weights through the CPU kernel: per-expert weights
    of a kernel dtype, on CPU, with ``decode_kernel`` on and the kernel built."""
    if not (cfg.decode_kernel and experts.is_split(weights[0])):
        return False
    if jax.default_backend() != "cpu":
        return False
    dtypes = {w[0].dtype for w in weights}
    return len(dtypes) == 1 and dtypes <= set(cpu_swiglu.KERNEL_DTYPES) and cpu_swiglu.available()


def _check_input(shape: tuple[int, ...], valid_BT: jax.Array | None, d_model: int) -> None:
    """One line naming the width expected, where a wrong one would fail deep in a matmul."""
    if len(shape) != 3 or shape[-1] != d_model:
        raise ValueError(f"MoELayer takes x of shape [batch, seq, d_model={d_model}]; "
                         f"got shape {tuple(shape)}")  # fmt: skip
    if valid_BT is not None and tuple(valid_BT.shape) != tuple(shape[:2]):
        raise ValueError(f"MoELayer takes valid_BT of shape [batch, seq] = {tuple(shape[:2])}; "
                         f"got shape {tuple(valid_BT.shape)}")  # fmt: skip


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
