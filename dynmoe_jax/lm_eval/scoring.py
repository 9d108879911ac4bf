"""Log-likelihoods of continuations, scored in batches of whole sequences.

A request is a context and a continuation (token ids). As lm-eval's own ``hf`` backend does,
the model reads the last ``max_length + 1`` tokens of context + continuation less the last one,
and the continuation's log-probability is the sum over its tokens of the log-softmax at the
positions that predict them; it is greedy when every one of those tokens is the argmax.

Speed: requests are sorted by length, longest first, and cut into batches of ``batch_size``
rows; a batch is right-padded to a bucket length (a power of two from ``MIN_BUCKET``, capped
at ``max_length``) and to ``batch_size`` rows, so the programs compiled are one per bucket in
use (``Scorer.programs``). Padding is marked invalid: it routes to no expert, and, the model
being causal, changes no real position's numbers.

The experts of a scored token are those of the position that predicts it, summed per MoE layer
([L] per request), so a task's mean is the layer metric ``token_experts`` over the same tokens.

Axis letters: B rows, T positions, V vocabulary, L MoE layers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dynmoe_jax.validation import check

MIN_BUCKET = 16


def bucket(length: int, max_length: int) -> int:
    """The padded length of a row of ``length`` positions."""
    width = MIN_BUCKET
    while width < length:
        width *= 2
    return min(width, max_length)


@dataclasses.dataclass(frozen=True)
class Score:
    """One request's result."""

    logprob: float
    greedy: bool
    experts_L: np.ndarray  # experts of the scored positions, summed, per MoE layer
    scored: int  # continuation tokens scored
    tokens: int  # positions the model ran for it (padding excluded)


@dataclasses.dataclass(frozen=True)
class _Row:
    inputs: list[int]
    targets: list[int]
    scored: int  # the last ``scored`` targets are the continuation's


def _row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> _Row:
    if not continuation:
        raise ValueError("a continuation needs at least one token")
    # lm-eval's hf backend would score a shifted slice here; one line says what to change.
    allowed = f"at least the longest continuation of the task ({len(continuation)} tokens)"
    check(len(continuation) <= max_length, "max_length", max_length, allowed)
    whole = [*context, *continuation][-(max_length + 1) :]
    return _Row(whole[:-1], whole[1:], len(continuation))


def _score_batch(graphdef, params, inputs_BT, targets_BT, valid_BT, scored_BT):
    logits_BTV, layers = nnx.merge(graphdef, params)(inputs_BT, valid_BT)
    target_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    logprob_B = jnp.sum(jnp.where(scored_BT, target_BT, 0.0), axis=-1)
    hit_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    greedy_B = jnp.all(hit_BT | ~scored_BT, axis=-1)
    if layers:
        experts_LBT = jnp.where(scored_BT[None], layers["token_experts"], 0)
        experts_LB = jnp.sum(experts_LBT, axis=-1)
    else:
        experts_LB = jnp.zeros((0, inputs_BT.shape[0]), jnp.int32)
    return logprob_B, greedy_B, experts_LB


class Scorer:
    """Scores requests with a model in the decode layout, batch by batch."""

    def __init__(self, graphdef, params, *, max_length: int, batch_size: int):
        self._graphdef, self._params = graphdef, params
        self.max_length, self.batch_size = max_length, batch_size
        self._programs: dict[tuple[int, int], jax.stages.Compiled] = {}
        self.compile_seconds = 0.0

    @property
    def programs(self) -> int:
        """Programs compiled so far: one per (rows, bucket length) in use."""
        return len(self._programs)

    def _program(self, arrays: tuple[np.ndarray, ...]) -> jax.stages.Compiled:
        key = arrays[0].shape
        if key not in self._programs:
            began = time.perf_counter()
            jitted = jax.jit(_score_batch, static_argnums=0)
            self._programs[key] = jitted.lower(self._graphdef, self._params, *arrays).compile()
            self.compile_seconds += time.perf_counter() - began
        return self._programs[key]

    def score(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> tuple[list[Score], float]:
        """(a Score per (context, continuation) request in order, seconds the model ran,
        compilation excluded)."""
        rows = [_row(c, x, self.max_length) for c, x in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
        out: list[Score | None] = [None] * len(rows)
        seconds = 0.0
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            arrays = self._arrays([rows[i] for i in chosen])
            program = self._program(arrays)
            began = time.perf_counter()
            logprob_B, greedy_B, experts_LB = jax.device_get(program(self._params, *arrays))
            seconds += time.perf_counter() - began
            for b, i in enumerate(chosen):
                out[i] = Score(float(logprob_B[b]), bool(greedy_B[b]), experts_LB[:, b],
                               rows[i].scored, len(rows[i].inputs))  # fmt: skip
        return out, seconds

    def _arrays(self, rows: list[_Row]) -> tuple[np.ndarray, ...]:
        """inputs, targets [B, T] and the masks of real and scored positions, padded."""
        shape = (self.batch_size, bucket(max(len(r.inputs) for r in rows), self.max_length))
        inputs_BT, targets_BT = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        valid_BT, scored_BT = np.zeros(shape, bool), np.zeros(shape, bool)
        for b, r in enumerate(rows):
            n = len(r.inputs)
            inputs_BT[b, :n], targets_BT[b, :n], valid_BT[b, :n] = r.inputs, r.targets, True
            scored_BT[b, n - r.scored : n] = True
        return inputs_BT, targets_BT, valid_BT, scored_BT
