"""Batched generation on device, and the decode layout it runs on.

* ``decode_layout(model_cfg, params)`` rearranges a model's parameters once for decoding: no
  capacity limits (every selected expert computes), the blocks one per layer (a scanned
  model's stacked [L, ...] parameters unstacked, since a step would otherwise slice every
  layer's weights out of them), and each MoE layer's experts in the per-expert layout in the
  compute dtype (``experts.py``), unless they are sharded over an ``expert`` mesh axis.
* ``generate(graphdef, params, prompts, max_new_tokens)`` runs a batch of prompts of different
  lengths: one prefill of the right-padded prompts into a key/value cache, then a
  ``lax.while_loop`` of one-token steps on device, each row at its own position, until every
  row has met the stop token or the budget of new tokens. A padded prompt position writes its
  keys and values at positions the row overwrites before any of its queries can see them.
* ``generate_full_window`` recomputes the whole window for every token: the reference.

Axis letters (the package's glossary): B rows, T positions (the padded prompt's, or the new
tokens'), V vocabulary, L MoE layers.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynmoe_jax import model as model_lib
from dynmoe_jax.model import layer_stack
from dynmoe_jax.moe import experts
from dynmoe_jax.moe.layer import MoELayer


def no_capacity_config(model_cfg: model_lib.ModelConfig) -> model_lib.ModelConfig:
    """``model_cfg`` without capacity limits or routing groups, so the experts counted are the
    router's own choice, as at inference in the paper."""
    if model_cfg.moe is None:
        return model_cfg
    no_drops = dataclasses.replace(model_cfg.moe, capacity_factor=None, group_size=None)
    return dataclasses.replace(model_cfg, moe=no_drops)


def decode_graphdef(model_cfg: model_lib.ModelConfig):
    """The graph that decoding runs: no capacity limits, one block per layer. Its parameters
    are ``decode_layout``'s; a config that differs only in routing (router, threshold, top_k,
    ...) shares them, so one decode layout serves every routing setting."""
    cfg = dataclasses.replace(no_capacity_config(model_cfg), scan_layers=False)
    return nnx.graphdef(model_lib.abstract_decoder(cfg))


def decode_layout(
    model_cfg: model_lib.ModelConfig, params: Any, expert_dtype: Any = None
) -> tuple[Any, nnx.State]:
    """(graphdef, params) of the model in the layout decoding reads (the module docstring);
    ``params`` as trained (a pure dict or a State), per layer or scanned. ``expert_dtype``:
    the per-expert weights' dtype (default: the compute dtype), e.g. bfloat16 expert weights
    in a float32 model, which the CPU kernel reads at half the bytes (``moe.decode_kernel``);
    XLA's forms cast them back to the compute dtype at every step."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if model_cfg.scan_layers:
        params = layer_stack.unstack_layers(params, lambda x, k: x[k])
    model = nnx.merge(decode_graphdef(model_cfg), params)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MoELayer) and _unsharded(module.w_gate_EDF.get_value()):
            module.split_experts(expert_dtype)
    return nnx.split(model)


def _unsharded(w: Any) -> bool:
    """Expert weights held whole by every device (not split over an ``expert`` mesh axis)."""
    return experts.is_split(w) or w.is_fully_replicated


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``generate`` produced, row by row."""

    tokens: list[list[int]]  # the new tokens of each row (its stop token excluded)
    # per row, [n, L]: per new token, the experts of the position that chose it in each MoE layer
    experts_by_layer: list[np.ndarray]
    logits: list[np.ndarray]  # per row, [n, V] float32 logits its tokens came from, if kept
    decode_steps: int  # one-token steps after the prefill, all rows together
    prefill_seconds: float
    decode_seconds: float

    @property
    def experts(self) -> list[list[float]]:
        """Per row, per new token: its experts, mean over the MoE layers (0 for a dense
        model)."""
        return [(e.sum(-1) / max(e.shape[-1], 1)).tolist() for e in self.experts_by_layer]

    @property
    def tokens_per_s(self) -> float | None:
        """The decode loop's rate: rows x steps per second (None when it ran no step)."""
        if not self.decode_steps:
            return None
        return len(self.tokens) * self.decode_steps / self.decode_seconds


def generate(
    graphdef,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    stop_id: int | Sequence[int] | None = None,
    keep_logits: bool = False,
    prompt_length: int | None = None,
) -> Generation:
    """Up to ``max_new_tokens`` new tokens after each prompt (lists of token ids, any
    lengths). Greedy when ``temperature`` is 0, else sampled: row b's draw at step i uses the
    key ``fold_in(fold_in(key(seed), i), b)``, so a seeded run repeats. A row stops before
    ``stop_id`` (one id or several). ``prompt_length``: the padded prompt width (default the
    longest prompt), so that batches of other lengths can share one compiled program.
    Prefill and loop are compiled before the clock starts."""
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    lengths_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
    longest = int(lengths_B.max())
    if prompt_length is not None and prompt_length < longest:
        raise ValueError(f"prompt_length={prompt_length} is shorter than a prompt ({longest})")
    prompt_BT = np.zeros((len(prompts), prompt_length or longest), np.int32)
    for b, p in enumerate(prompts):
        prompt_BT[b, : len(p)] = p
    cache = nnx.merge(graphdef, params).init_cache(
        len(prompts), prompt_BT.shape[1] + max_new_tokens
    )
    args = (jnp.float32(temperature), jax.random.key(seed))
    prefill = _prefill.lower(graphdef, params, prompt_BT, lengths_B, cache, *args).compile()
    began = time.perf_counter()
    first = jax.block_until_ready(prefill(params, prompt_BT, lengths_B, cache, *args))
    prefill_seconds = time.perf_counter() - began
    token_B, experts_B, logits_BV, cache = first
    stops = _stop_ids(stop_id)
    stop = jnp.asarray(stops or [-1], jnp.int32)
    loop_args = (graphdef, params, cache, token_B, lengths_B, experts_B, logits_BV, stop, *args)
    statics = {"steps": max_new_tokens - 1, "keep_logits": keep_logits}
    loop = _decode_loop.lower(*loop_args, **statics).compile()
    began = time.perf_counter()
    out = jax.block_until_ready(loop(*loop_args[1:]))
    decode_seconds = time.perf_counter() - began
    tokens_BT, experts_BTL, logits_BTV, steps = jax.device_get(out)
    return _rows(tokens_BT, experts_BTL, logits_BTV if keep_logits else None, stops,
                 int(steps), prefill_seconds, decode_seconds)  # fmt: skip


def _stop_ids(stop_id: int | Sequence[int] | None) -> list[int]:
    if stop_id is None:
        return []
    return [int(stop_id)] if np.ndim(stop_id) == 0 else [int(i) for i in stop_id]


def _rows(tokens_BT, experts_BTL, logits_BTV, stops, steps, prefill_s, decode_s) -> Generation:
    """The per-row lists: each row cut before its first stop token."""
    tokens, by_layer, logits = [], [], []
    for b, row in enumerate(tokens_BT[:, : steps + 1].tolist()):
        n = next((i for i, token in enumerate(row) if token in stops), len(row))
        tokens.append(row[:n])
        by_layer.append(np.asarray(experts_BTL[b, :n], np.float32))
        if logits_BTV is not None:
            logits.append(np.asarray(logits_BTV[b, :n], np.float32))
    return Generation(tokens, by_layer, logits, steps, prefill_s, decode_s)


def _choose(logits_BV, key, step, temperature):
    """Each row's next token: argmax, or a draw at ``temperature`` with its own key."""
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.fold_in(key, step), jnp.arange(logits_BV.shape[0])
    )
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    sampled_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV)
    return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


def _layer_experts(experts_LBT, at_B) -> jax.Array:
    """Experts of row b's position at_B[b] in each MoE layer ([B, L])."""
    picked_LB = jnp.take_along_axis(experts_LBT, at_B[None, :, None], axis=2)[..., 0]
    return picked_LB.T.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(graphdef, params, prompt_BT, lengths_B, cache, temperature, key):
    """Every prompt into the cache; each row's first new token, its experts and logits."""
    logits_BTV, experts_LBT, cache = nnx.merge(graphdef, params).decode(prompt_BT, cache, 0)
    last_B = lengths_B - 1
    logits_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]
    token_B = _choose(logits_BV, key, 0, temperature)
    return token_B, _layer_experts(experts_LBT, last_B), logits_BV, cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("steps", "keep_logits"))
def _decode_loop(graphdef, params, cache, token_B, position_B, experts_BL, logits_BV, stop,
                 temperature, key, *, steps: int, keep_logits: bool):  # fmt: skip
    """Up to ``steps`` one-token steps of every row; stops early once every row has produced
    one of the ``stop`` ids. Returns (tokens [B, steps + 1], experts [B, steps + 1, L], logits,
    steps run)."""
    model = nnx.merge(graphdef, params)
    b, v = logits_BV.shape
    tokens_BT = jnp.zeros((b, steps + 1), jnp.int32).at[:, 0].set(token_B)
    experts_BTL = jnp.zeros((b, steps + 1, experts_BL.shape[1]), jnp.float32)
    experts_BTL = experts_BTL.at[:, 0].set(experts_BL)
    kept = (b, steps + 1, v) if keep_logits else (b, 1, v)
    logits_BTV = jnp.zeros(kept, jnp.float32).at[:, 0].set(logits_BV)

    def running(state):
        i, done_B = state[0], state[3]
        return (i < steps) & ~jnp.all(done_B)

    def step(state):
        i, cache, token_B, done_B, position_B, tokens_BT, experts_BTL, logits_BTV = state
        logits_B1V, experts_LB1, cache = model.decode(token_B[:, None], cache, position_B)
        logits_BV = logits_B1V[:, 0]
        token_B = _choose(logits_BV, key, i + 1, temperature)
        tokens_BT = tokens_BT.at[:, i + 1].set(token_B)
        experts_BTL = experts_BTL.at[:, i + 1].set(
            _layer_experts(experts_LB1, jnp.zeros_like(token_B))
        )
        if keep_logits:
            logits_BTV = logits_BTV.at[:, i + 1].set(logits_BV)
        done_B = done_B | jnp.isin(token_B, stop)
        return i + 1, cache, token_B, done_B, position_B + 1, tokens_BT, experts_BTL, logits_BTV

    init = (jnp.int32(0), cache, token_B, jnp.isin(token_B, stop), position_B, tokens_BT,
            experts_BTL, logits_BTV)  # fmt: skip
    i, _, _, _, _, tokens_BT, experts_BTL, logits_BTV = jax.lax.while_loop(running, step, init)
    return tokens_BT, experts_BTL, logits_BTV, i


def generate_full_window(
    graphdef, params, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[np.ndarray], float | None]:
    """The reference for ``generate``: greedy tokens after one prompt, each computed by
    running the whole window of len(prompt) + max_new_tokens positions again (no cache), with
    their logits and the rate of the calls after the first (which compiles)."""
    window = len(prompt_ids) + max_new_tokens
    tokens, logits = list(prompt_ids), []
    began = None
    for _ in range(max_new_tokens):
        padded_1T = np.zeros((1, window), np.int32)
        padded_1T[0, : len(tokens)] = tokens
        logits.append(np.asarray(_logits_at(graphdef, params, padded_1T, len(tokens) - 1)))
        tokens.append(int(np.argmax(logits[-1])))
        began = time.perf_counter() if began is None else began
    calls = max_new_tokens - 1
    rate = calls / (time.perf_counter() - began) if calls else None
    return tokens[len(prompt_ids) :], logits, rate


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(graphdef, params, tokens_1T, position):
    # The model is causal: the padding after `position` does not change its logits.
    logits_1TV, _ = nnx.merge(graphdef, params)(tokens_1T)
    return logits_1TV[0, position]
