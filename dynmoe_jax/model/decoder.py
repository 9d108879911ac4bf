"""A small LLaMA-style decoder whose feed-forward is the MoE layer (or dense), in Flax NNX.

Axis letters (the package docstring's glossary): B batch, T sequence (queries), U key
positions, D model width, F hidden width, N heads, J key/value heads (grouped-query
attention: each serves N / J query heads), H head width, V vocabulary, L layers, O
super-blocks; X and Y a matmul's input and output widths, A the heads of a projection (N or
J).

Block: x + Attention(RMSNorm(x)), then h + FFN(RMSNorm(h)) with FFN = MoELayer in every
``moe_every``-th layer (the last of each run of ``moe_every``) and a dense SwiGLU elsewhere;
a MoE layer may add a shared SwiGLU expert that every token passes through (Qwen2-MoE).
The optional features (grouped-query attention, q/k biases and norms, tied embeddings, the
shared expert) are those of Mixtral, OLMoE and Qwen2-MoE, so that their checkpoints load;
each defaults to the plain decoder. The blocks run one by one or, with ``scan_layers``,
scanned over super-blocks of ``moe_every`` layers (``layer_stack``). (Over 300 lines: most
of the growth is the config's validation of those features, kept beside the fields it
checks, the two layouts of the blocks in the Decoder, and their cached decoding.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax.model import layer_stack
from dynmoe_jax.model.attention import cached_attention, causal_attention
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.moe.experts import swiglu
from dynmoe_jax.moe.layer import MoELayer
from dynmoe_jax.moe.metrics import LAYER_METRICS


def _matmul_2d(x_BTX: jax.Array, w_XY: jax.Array) -> jax.Array:
    """x [B, T, X] @ w [X, Y] written as one [B*T, X] x [X, Y] product: XLA on CPU ran the
    einsums over [B, T, ...] and [D, N, H] operands slower at decode sizes."""
    b, t, width = x_BTX.shape
    return (x_BTX.reshape(b * t, width) @ w_XY).reshape(b, t, -1)


def _param(rngs, shape, fan_in_axes: tuple[int, ...], logical_axes) -> nnx.Param:
    # The MoE layer's convention, so that one rule initialises the whole model: a truncated
    # normal of variance 1 / fan_in (the axes the weight contracts with its input), the
    # truncation corrected for so the variance is exact; every other axis is an output.
    out_axes = tuple(a for a in range(len(shape)) if a not in fan_in_axes)
    init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=fan_in_axes, out_axis=out_axes
    )
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float):
        self.scale_D = nnx.Param(jnp.ones((d,)), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale_D[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * scale).astype(x.dtype)


def rope(x_BTNH: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on the two halves of each head, frequencies theta^(-2i/H), at
    ``positions`` [T] (every row alike) or [B, T] (a position per row and token).

    The convention of Hugging Face's ``rotate_half`` (LLaMA, Mixtral, OLMoE, Qwen2-MoE), so
    their checkpoints' q and k projections load unpermuted.
    """
    half = x_BTNH.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    freq = freq.reshape((1,) * positions.ndim + (half,))
    angle = positions.astype(jnp.float32)[..., None] * freq  # [T, H/2] or [B, T, H/2]
    angle_BTH = angle.reshape((-1,) + angle.shape[-2:])
    sin, cos = jnp.sin(angle_BTH)[:, :, None, :], jnp.cos(angle_BTH)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
    """Causal self-attention with RoPE: N query heads, J key/value heads, width H each.

    Optional, for imported checkpoints: biases on the q, k, v projections (``qkv_bias``) and
    an RMSNorm over the whole q projection (N * H features) and the whole k projection
    (J * H features) before RoPE (``qk_norm``, as OLMoE does).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_width
        self.wq_DNH = _param(rngs, (d, n, h), (0,), ("embed", "heads", "head_dim"))
        self.wk_DJH = _param(rngs, (d, k, h), (0,), ("embed", "kv_heads", "head_dim"))
        self.wv_DJH = _param(rngs, (d, k, h), (0,), ("embed", "kv_heads", "head_dim"))
        self.wo_NHD = _param(rngs, (n, h, d), (0, 1), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.bq_NH = nnx.Param(jnp.zeros((n, h)), logical_axes=("heads", "head_dim"))
            self.bk_JH = nnx.Param(jnp.zeros((k, h)), logical_axes=("kv_heads", "head_dim"))
            self.bv_JH = nnx.Param(jnp.zeros((k, h)), logical_axes=("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(n * h, cfg.norm_eps)
            self.k_norm = RMSNorm(k * h, cfg.norm_eps)
        self.cfg = cfg

    def _project(self, x_BTD, w, bias, norm) -> jax.Array:
        """x projected to heads ([B, T, heads, H]), plus its bias, then normed over all heads."""
        w_DAH = w[...].astype(self.cfg.dtype)
        y = _matmul_2d(x_BTD, w_DAH.reshape(w_DAH.shape[0], -1)).reshape(
            x_BTD.shape[:2] + w_DAH.shape[1:]
        )
        if bias is not None:
            y = y + bias[...].astype(w_DAH.dtype)[None, None]
        if norm is not None:
            y = norm(y.reshape(y.shape[:2] + (-1,))).reshape(y.shape)
        return y

    def _qkv(self, x_BTD, pos_T) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k (rotated to the positions pos_T) and v of the tokens x."""
        cfg = self.cfg
        bias = (self.bq_NH, self.bk_JH, self.bv_JH) if cfg.qkv_bias else (None, None, None)
        norm = (self.q_norm, self.k_norm) if cfg.qk_norm else (None, None)
        q_BTNH = self._project(x_BTD, self.wq_DNH, bias[0], norm[0])
        k_BTJH = self._project(x_BTD, self.wk_DJH, bias[1], norm[1])
        v_BTJH = self._project(x_BTD, self.wv_DJH, bias[2], None)
        q_BTNH = rope(q_BTNH, pos_T, cfg.rope_theta)
        k_BTJH = rope(k_BTJH, pos_T, cfg.rope_theta)
        return q_BTNH, k_BTJH, v_BTJH

    def _out(self, out_BTNH):
        b, t, n, h = out_BTNH.shape
        wo_XD = self.wo_NHD[...].astype(self.cfg.dtype).reshape(n * h, -1)
        return _matmul_2d(out_BTNH.reshape(b, t, n * h), wo_XD)

    def __call__(self, x_BTD):
        q_BTNH, k_BUJH, v_BUJH = self._qkv(x_BTD, jnp.arange(x_BTD.shape[1]))
        return self._out(causal_attention(q_BTNH, k_BUJH, v_BUJH))

    def decode(self, x_BTD, k_BUJH, v_BUJH, start):
        """The tokens x of row b at positions start[b] .. start[b] + T - 1 (``start``: a
        scalar for every row, or [B]), their keys and values first written into the cache
        (k, v over U positions); returns (output, k, v)."""
        b, t = x_BTD.shape[:2]
        start_B = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))
        q_BTNH, k_BTJH, v_BTJH = self._qkv(x_BTD, start_B[:, None] + jnp.arange(t)[None, :])
        write = jax.vmap(lambda c_UJH, new_TJH, at: jax.lax.dynamic_update_slice_in_dim(
            c_UJH, new_TJH.astype(c_UJH.dtype), at, 0))  # fmt: skip
        k_BUJH, v_BUJH = write(k_BUJH, k_BTJH, start_B), write(v_BUJH, v_BTJH, start_B)
        return self._out(cached_attention(q_BTNH, k_BUJH, v_BUJH, start_B)), k_BUJH, v_BUJH


class DenseFFN(nnx.Module):
    """SwiGLU feed-forward (the dense layers and the dense baseline)."""

    def __init__(self, d: int, f: int, dtype, rngs: nnx.Rngs):
        self.w_gate_DF = _param(rngs, (d, f), (0,), ("embed", "mlp"))
        self.w_up_DF = _param(rngs, (d, f), (0,), ("embed", "mlp"))
        self.w_down_FD = _param(rngs, (f, d), (0,), ("mlp", "embed"))
        self.dtype = dtype

    def __call__(self, x_BTD, valid_BT=None):
        del valid_BT  # every token passes, padding or not: only the MoE layer routes
        weights = (self.w_gate_DF, self.w_up_DF, self.w_down_FD)
        return swiglu(x_BTD, *(w[...].astype(self.dtype) for w in weights)), None


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.has_shared = cfg.is_moe_layer(layer) and cfg.shared_d_ff is not None
        self.has_shared_gate = self.has_shared and cfg.shared_gate
        if cfg.is_moe_layer(layer):
            self.ffn = MoELayer(cfg.moe_layer(layer), rngs=rngs)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.dtype, rngs)
        if self.has_shared:
            self.shared = DenseFFN(cfg.d_model, cfg.shared_d_ff, cfg.dtype, rngs)
        if self.has_shared_gate:
            self.shared_gate_D = _param(rngs, (cfg.d_model,), (0,), ("embed",))

    def __call__(self, x_BTD, valid_BT=None):
        """(x, the MoE layer's aux or None); ``valid_BT``: the tokens that are not padding."""
        return self._feed_forward(x_BTD + self.attn(self.attn_norm(x_BTD)), valid_BT)

    def decode(self, x_BTD, k_BUJH, v_BUJH, start):
        """``__call__`` for tokens at positions start.. with a key/value cache (see
        ``Attention.decode``); returns (x, aux, k, v)."""
        a_BTD, k_BUJH, v_BUJH = self.attn.decode(self.attn_norm(x_BTD), k_BUJH, v_BUJH, start)
        return *self._feed_forward(x_BTD + a_BTD), k_BUJH, v_BUJH

    def _feed_forward(self, h_BTD, valid_BT=None):
        normed_BTD = self.ffn_norm(h_BTD)
        y_BTD, aux = self.ffn(normed_BTD, valid_BT)
        if self.has_shared:
            y_BTD = y_BTD + self._shared_expert(normed_BTD)
        return h_BTD + y_BTD, aux

    def _shared_expert(self, x_BTD):
        """The shared expert on every token, scaled per token by its sigmoid gate if any."""
        y_BTD, _ = self.shared(x_BTD)
        if self.has_shared_gate:
            gate_BT = jax.nn.sigmoid(x_BTD @ self.shared_gate_D[...].astype(x_BTD.dtype))
            y_BTD = y_BTD * gate_BT[..., None]
        return y_BTD


class SuperBlock(nnx.Module):
    """``moe_every`` consecutive layers (the dense ones, then the MoE one): the unit of the
    scan. Returns the MoE layer's metrics (None in a dense model)."""

    def __init__(self, cfg: ModelConfig, first_layer: int, rngs: nnx.Rngs):
        layers = range(first_layer, first_layer + cfg.moe_every)
        self.blocks = nnx.List([Block(cfg, i, rngs) for i in layers])

    def __call__(self, x_BTD, valid_BT=None):
        aux = None
        for block in self.blocks:
            x_BTD, layer_aux = block(x_BTD, valid_BT)
            aux = layer_aux if layer_aux is not None else aux
        return x_BTD, aux

    def decode(self, x_BTD, k_LBUJH, v_LBUJH, start):
        """``__call__`` with the blocks' key/value caches stacked on a leading axis."""
        aux, ks, vs = None, [], []
        for j, block in enumerate(self.blocks):
            x_BTD, layer_aux, k_BUJH, v_BUJH = block.decode(x_BTD, k_LBUJH[j], v_LBUJH[j], start)
            aux = layer_aux if layer_aux is not None else aux
            ks.append(k_BUJH)
            vs.append(v_BUJH)
        return x_BTD, aux, jnp.stack(ks), jnp.stack(vs)


class Decoder(nnx.Module):
    """Token ids [B, T] -> float32 logits [B, T, V] and per-MoE-layer metrics (leading L).

    With ``scan_layers`` the blocks live in ``scan_blocks`` (a SuperBlock whose parameters are
    stacked on a leading ``layers`` axis) and ``tail_blocks`` (the num_layers % moe_every
    layers after the last full super-block); otherwise in ``blocks``, one per layer. Both
    draw the same initial values from the same seed (``layer_stack`` describes the layouts).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d = cfg.vocab_size, cfg.d_model
        # A lookup is a product with a one-hot row: fan-in 1, so variance 1, as in Flax's lm1b
        # example. Tied, the table is also the head, whose fan-in is D (MaxText's embedding
        # convention): tied logits of the unit-RMS final activations then start at unit scale.
        # Untied, fan-in D would start the embeddings at RMS 1/sqrt(d_model), small beside the
        # blocks' outputs, and make train's loss fell more slowly with it.
        fan_in = (1,) if cfg.tie_embeddings else ()
        self.embed_VD = _param(rngs, (v, d), fan_in, ("vocab", "embed"))
        if cfg.scan_layers:
            m, supers = cfg.moe_every, cfg.num_layers // cfg.moe_every
            self.scan_blocks = layer_stack.stack_modules(
                [SuperBlock(cfg, k * m, rngs) for k in range(supers)]
            )
            tail = range(supers * m, cfg.num_layers)
            self.tail_blocks = nnx.List([Block(cfg, i, rngs) for i in tail])
        else:
            self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head_DV = _param(rngs, (d, v), (0,), ("embed", "vocab"))

    def __call__(
        self, tokens_BT: jax.Array, valid_BT: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``valid_BT``: the positions that are not padding (None: all). Padding routes to no
        expert and is left out of the MoE layers' aux losses and metrics."""
        cfg = self.cfg
        x_BTD = self.embed_VD[...].astype(cfg.dtype)[tokens_BT]
        metrics = {}
        if cfg.scan_layers:
            x_BTD, aux = layer_stack.scan_stack(self.scan_blocks, x_BTD, cfg.remat, valid_BT)
            metrics = {k: aux[k] for k in LAYER_METRICS} if aux is not None else {}
            unscanned = self.tail_blocks  # dense layers only: no metrics
        else:
            unscanned = self.blocks
        layer_aux = []
        for block in unscanned:
            x_BTD, aux = layer_stack.apply_block(block, x_BTD, cfg.remat, valid_BT)
            if aux is not None:
                layer_aux.append(aux)
        metrics = metrics or _stack_layer_metrics(layer_aux)
        return self.logits(self.final_norm(x_BTD)), metrics

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in the order of the per-layer metrics: one module per layer, or the
        scanned stack's one module whose variables carry every layer on a leading axis."""
        if self.cfg.scan_layers:
            return [b.ffn for b in self.scan_blocks.blocks if isinstance(b.ffn, MoELayer)]
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty key/value cache of ``length`` positions for ``batch`` sequences."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.head_width)
        return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))

    def decode(
        self, tokens_BT: jax.Array, cache: KVCache, start: jax.Array
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """The tokens at positions start .. start + T - 1 of sequences whose earlier positions
        are in ``cache`` (``start``: a scalar, or [B] for rows at different positions): float32
        logits [B, T, V], the experts each token used per MoE layer [L_moe, B, T], and the
        cache with these tokens' keys and values written. The same numbers as ``__call__`` on
        the whole sequence (no capacity limit assumed)."""
        cfg = self.cfg
        x_BTD = self.embed_VD[...].astype(cfg.dtype)[tokens_BT]
        k_LBUJH, v_LBUJH = cache
        experts = []
        first = 0
        if cfg.scan_layers:
            first = cfg.num_layers // cfg.moe_every * cfg.moe_every
            x_BTD, aux, scanned_k_LBUJH, scanned_v_LBUJH = _scan_decode(
                self.scan_blocks, x_BTD, k_LBUJH[:first], v_LBUJH[:first], start, cfg.moe_every
            )
            experts = list(aux["token_experts"]) if aux is not None else []
            k_LBUJH = k_LBUJH.at[:first].set(scanned_k_LBUJH)
            v_LBUJH = v_LBUJH.at[:first].set(scanned_v_LBUJH)
        blocks = self.tail_blocks if cfg.scan_layers else self.blocks
        for i, block in enumerate(blocks, start=first):
            x_BTD, aux, k_BUJH, v_BUJH = block.decode(x_BTD, k_LBUJH[i], v_LBUJH[i], start)
            k_LBUJH, v_LBUJH = k_LBUJH.at[i].set(k_BUJH), v_LBUJH.at[i].set(v_BUJH)
            if aux is not None:
                experts.append(aux["token_experts"])
        b, t = tokens_BT.shape
        experts_LBT = jnp.stack(experts) if experts else jnp.zeros((0, b, t), jnp.int32)
        return self.logits(self.final_norm(x_BTD)), experts_LBT, KVCache(k_LBUJH, v_LBUJH)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """Float32 logits of the final-normed activations: head_DV, or the embedding when tied."""
        dt = self.cfg.dtype
        if self.cfg.tie_embeddings:
            logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, self.embed_VD[...].astype(dt))
        else:
            logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, self.head_DV[...].astype(dt))
        return logits_BTV.astype(jnp.float32)


class KVCache(NamedTuple):
    """Keys and values of every layer (in layer order) at each cached position."""

    k_LBUJH: jax.Array
    v_LBUJH: jax.Array


def _scan_decode(stacked: SuperBlock, x_BTD, k_LBUJH, v_LBUJH, start, moe_every: int):
    """``SuperBlock.decode`` scanned over the stacked super-blocks, the caches of their
    layers (layer k * m + j is super-block k's block j) scanned with them."""
    graphdef, state = nnx.split(stacked)
    k_OLBUJH, v_OLBUJH = (a.reshape(-1, moe_every, *a.shape[1:]) for a in (k_LBUJH, v_LBUJH))

    def body(y_BTD, xs):
        st, k_LBUJH, v_LBUJH = xs  # one super-block's layers
        y_BTD, aux, k_LBUJH, v_LBUJH = nnx.merge(graphdef, st).decode(
            y_BTD, k_LBUJH, v_LBUJH, start
        )
        return y_BTD, (aux, k_LBUJH, v_LBUJH)

    x_BTD, (aux, k_OLBUJH, v_OLBUJH) = jax.lax.scan(body, x_BTD, (state, k_OLBUJH, v_OLBUJH))
    return x_BTD, aux, k_OLBUJH.reshape(k_LBUJH.shape), v_OLBUJH.reshape(v_LBUJH.shape)


def abstract_decoder(cfg: ModelConfig) -> Decoder:
    """The decoder's structure and shapes, with no parameters allocated."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _stack_layer_metrics(layer_aux: list[dict]) -> dict[str, jax.Array]:
    if not layer_aux:
        return {}
    return {k: jnp.stack([a[k] for a in layer_aux]) for k in LAYER_METRICS}
