"""A small LLaMA-style decoder whose feed-forward is the MoE layer (or dense), in Flax NNX.

Axis letters (the package docstring's glossary): B batch, T sequence (queries), U key
positions, D model width, F hidden width, N heads, H head width, V vocabulary, L layers.

Block: x + Attention(RMSNorm(x)), then h + FFN(RMSNorm(h)) with FFN = MoELayer in every
``moe_every``-th layer (the last of each run of ``moe_every``) and a dense SwiGLU elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax.moe import MoEConfig, MoELayer
from dynmoe_jax.validation import check, is_int

# Metrics of every MoE layer that the model stacks along a leading L axis.
LAYER_METRICS = (
    "load_balance_loss",
    "dynamic_loss",
    "z_loss",
    "experts_per_token",
    "experts_per_token_max",
    "slots_per_token",
    "dropped_fraction",
    "router_confidence",
    "token_experts",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512  # dense layers' hidden width
    moe: MoEConfig | None = None  # None: a dense model
    moe_every: int = 1
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        # Types first, so that the range rules below never compare a str with an int.
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "moe_every"):
            value = getattr(self, field)
            check(is_int(value), f"model.{field}", value, "an integer")
        d, n, layers = self.d_model, self.num_heads, self.num_layers
        rules = [  # (ok, field, allowed), checked in order
            (self.vocab_size >= 2, "vocab_size", "an integer >= 2"),
            (d >= 1, "d_model", "an integer >= 1"),
            (layers >= 1, "num_layers", "an integer >= 1"),
            (self.d_ff >= 1, "d_ff", "an integer >= 1"),
            (n >= 1 and d % n == 0, "num_heads", f"an integer >= 1 dividing model.d_model={d}"),
            # RoPE rotates pairs of a head's features.
            (
                n >= 1 and d // n % 2 == 0,
                "num_heads",
                f"a divisor of model.d_model={d} giving an even head width",
            ),
            (1 <= self.moe_every <= layers, "moe_every", f"1..model.num_layers={layers}"),
        ]
        for ok, field, allowed in rules:
            check(ok, f"model.{field}", getattr(self, field), allowed)
        if self.moe is not None:
            check(self.moe.d_model == d, "moe.d_model", self.moe.d_model, f"model.d_model={d}")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))


def _param(rngs, shape, fan_in_axes, logical_axes, scale=1.0) -> nnx.Param:
    fan_in = 1
    for a in fan_in_axes:
        fan_in *= shape[a]
    w = jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape) * (scale / fan_in) ** 0.5
    return nnx.Param(w, logical_axes=logical_axes)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float):
        self.scale_D = nnx.Param(jnp.ones((d,)), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale_D[...]).astype(x.dtype)


def rope(x_BTNH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on the two halves of each head."""
    half = x_BTNH.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_TH = positions_T[:, None].astype(jnp.float32) * freq[None, :]
    sin, cos = jnp.sin(angle_TH)[:, None, :], jnp.cos(angle_TH)[:, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, h = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
        axes_in = ("embed", "heads", "head_dim")
        self.wq_DNH = _param(rngs, (d, n, h), (0,), axes_in)
        self.wk_DNH = _param(rngs, (d, n, h), (0,), axes_in)
        self.wv_DNH = _param(rngs, (d, n, h), (0,), axes_in)
        self.wo_NHD = _param(rngs, (n, h, d), (0, 1), ("heads", "head_dim", "embed"))
        self.cfg = cfg

    def __call__(self, x_BTD):
        dt, t = self.cfg.dtype, x_BTD.shape[1]
        pos_T = jnp.arange(t)
        q = rope(jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...].astype(dt)), pos_T,
                 self.cfg.rope_theta)  # fmt: skip
        k = rope(jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wk_DNH[...].astype(dt)), pos_T,
                 self.cfg.rope_theta)  # fmt: skip
        v = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.wv_DNH[...].astype(dt))
        scores_BNTU = jnp.einsum("BTNH,BUNH->BNTU", q, k).astype(jnp.float32)
        scores_BNTU /= jnp.sqrt(q.shape[-1]).astype(jnp.float32)
        causal_TU = jnp.tril(jnp.ones((t, t), bool))
        scores_BNTU = jnp.where(causal_TU, scores_BNTU, jnp.finfo(jnp.float32).min)
        probs_BNTU = jax.nn.softmax(scores_BNTU, axis=-1).astype(dt)
        out_BTNH = jnp.einsum("BNTU,BUNH->BTNH", probs_BNTU, v)
        return jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.wo_NHD[...].astype(dt))


class DenseFFN(nnx.Module):
    """SwiGLU feed-forward (the dense layers and the dense baseline)."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs):
        self.w_gate_DF = _param(rngs, (d, f), (0,), ("embed", "mlp"))
        self.w_up_DF = _param(rngs, (d, f), (0,), ("embed", "mlp"))
        self.w_down_FD = _param(rngs, (f, d), (0,), ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x_BTD):
        dt = self.dtype
        gate = x_BTD @ self.w_gate_DF[...].astype(dt)
        up = x_BTD @ self.w_up_DF[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.w_down_FD[...].astype(dt), None


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer):
            self.ffn = MoELayer(config=cfg.moe, rngs=rngs)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.dtype, rngs)

    def __call__(self, x_BTD):
        h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
        y_BTD, aux = self.ffn(self.ffn_norm(h_BTD))
        return h_BTD + y_BTD, aux


class Decoder(nnx.Module):
    """Token ids [B, T] -> float32 logits [B, T, V] and per-MoE-layer metrics (leading L)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d = cfg.vocab_size, cfg.d_model
        self.embed_VD = nnx.Param(
            jax.random.normal(rngs.params(), (v, d)), logical_axes=("vocab", "embed")
        )
        self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        self.head_DV = _param(rngs, (d, v), (0,), ("embed", "vocab"))

    def __call__(self, tokens_BT: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x_BTD = self.embed_VD[...].astype(self.cfg.dtype)[tokens_BT]
        layer_aux = []
        for block in self.blocks:
            call = nnx.remat(lambda b, x: b(x)) if self.cfg.remat else (lambda b, x: b(x))
            x_BTD, aux = call(block, x_BTD)
            if aux is not None:
                layer_aux.append(aux)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.head_DV[...].astype(self.cfg.dtype))
        return logits_BTV.astype(jnp.float32), _stack_layer_metrics(layer_aux)


def abstract_decoder(cfg: ModelConfig) -> Decoder:
    """The decoder's structure and shapes, with no parameters allocated."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _stack_layer_metrics(layer_aux: list[dict]) -> dict[str, jax.Array]:
    if not layer_aux:
        return {}
    return {k: jnp.stack([a[k] for a in layer_aux]) for k in LAYER_METRICS}
