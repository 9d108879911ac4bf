"""Batched scoring against a float64 log-softmax of the whole sequence, run unpadded in the
trained layout: the same log-probabilities, greedy flags and experts, whatever the batch size
and the bucket lengths."""

import numpy as np
import pytest
from flax import nnx

from dynmoe_jax.generate import decode_layout
from dynmoe_jax.lm_eval import scoring
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.model.decoder import Decoder
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.validation import ConfigError

V = 48
CFG = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=2, d_ff=48,
                  moe=MoEConfig(num_experts=4, d_model=32, d_ff=16, threshold=0.6,
                                capacity_factor=None))  # fmt: skip
rng = np.random.default_rng(0)
# (context, continuation) of many lengths; one longer than the window is cut from the left.
REQUESTS = [(rng.integers(0, V, size=c).tolist(), rng.integers(0, V, size=x).tolist())
            for c, x in [(3, 2), (1, 1), (20, 5), (7, 9), (40, 4), (2, 12), (11, 1)]]  # fmt: skip
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(3))


_forward = nnx.jit(lambda model, tokens: model(tokens))


def _reference(model, context, continuation, max_length=MAX_LENGTH):
    """float64 log-softmax of one sequence in the trained layout: the continuation's
    log-probability, whether it is greedy, and its positions' experts per layer. The sequence
    runs alone, followed by zeros up to the window (the model is causal: what follows changes
    nothing before it), so one program serves every request."""
    whole = [*context, *continuation][-(max_length + 1) :]
    tokens = np.zeros((1, max_length), np.int32)
    tokens[0, : len(whole) - 1] = whole[:-1]
    logits, layers = _forward(model, tokens)
    logits = np.asarray(logits[0, : len(whole) - 1], np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)  # fmt: skip
    n = len(continuation)
    rows, targets = np.arange(len(whole) - 1 - n, len(whole) - 1), np.asarray(whole[-n:])
    greedy = bool(np.all(np.argmax(logits[rows], -1) == targets))
    experts = np.asarray(layers["token_experts"])[:, 0, rows].sum(-1)
    return float(logp[rows, targets].sum()), greedy, experts


def _scorer(model, batch_size, max_length=MAX_LENGTH):
    graphdef, params = decode_layout(CFG, nnx.state(model))
    return scoring.Scorer(graphdef, params, max_length=max_length, batch_size=batch_size)


def test_bucket_lengths_are_powers_of_two_capped_at_the_window():
    assert [scoring.bucket(n, 100) for n in (1, 16, 17, 33, 64, 65, 99)] == [
        16, 16, 32, 64, 64, 100, 100]  # fmt: skip
    assert scoring.bucket(5, 8) == 8


def test_scores_equal_a_float64_log_softmax_of_each_whole_sequence(model):
    scores, seconds = _scorer(model, batch_size=4).score(REQUESTS)
    assert seconds > 0
    for (context, continuation), score in zip(REQUESTS, scores, strict=True):
        logprob, greedy, experts = _reference(model, context, continuation)
        np.testing.assert_allclose(score.logprob, logprob, rtol=1e-5, atol=1e-4)
        assert score.greedy == greedy
        np.testing.assert_array_equal(score.experts_L, experts)
        assert score.scored == len(continuation)
        assert score.tokens == min(len(context) + len(continuation) - 1, MAX_LENGTH)


def test_batch_size_and_buckets_change_no_number(model):
    single, eight = _scorer(model, batch_size=1), _scorer(model, batch_size=8)
    one, _ = single.score(REQUESTS)
    many, _ = eight.score(REQUESTS)
    # Row by row: the buckets of 16 and 32 positions; all rows at once: one batch of 32.
    assert (single.programs, eight.programs) == (2, 1)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.logprob, b.logprob, rtol=1e-6, atol=1e-5)
        assert a.greedy == b.greedy
        np.testing.assert_array_equal(a.experts_L, b.experts_L)


def test_a_greedy_continuation_is_flagged(model):
    context = REQUESTS[2][0]
    tokens = np.zeros((1, MAX_LENGTH), np.int32)
    tokens[0, : len(context)] = context
    logits, _ = _forward(model, tokens)
    best = int(np.argmax(np.asarray(logits[0, len(context) - 1])))
    (score,), _ = _scorer(model, batch_size=1).score([(context, [best])])
    assert score.greedy
    (worse,), _ = _scorer(model, batch_size=1).score([(context, [(best + 1) % V])])
    assert not worse.greedy


def test_a_continuation_longer_than_the_window_is_refused(model):
    with pytest.raises(ConfigError, match="^max_length=32 is invalid: allowed at least the"):
        _scorer(model, batch_size=1).score([([1], list(range(33)))])
