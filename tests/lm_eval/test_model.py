"""The lm-eval model on an imported checkpoint and on a trained workdir: lm-eval's
tokenisation, rolling log-likelihoods against --mode=eval's loss, generate_until against the
project's generate, and the experts each task gets against the layer metric."""

import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from dynmoe_jax import config as config_lib
from dynmoe_jax import generate as generate_lib
from dynmoe_jax import train as train_lib
from dynmoe_jax.inference import restore
from dynmoe_jax.lm_eval import DynMoELM
from dynmoe_jax.pretrained import from_hf
from dynmoe_jax.validation import ConfigError
from tests.pretrained.hf_fixtures import FIXTURES

MIXTRAL = FIXTURES / "mixtral"


def _requests(kind, args, task="task_a"):
    return [Instance(kind, {}, a, i, (task, i, 1)) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def imported():
    return DynMoELM(pretrained=str(MIXTRAL), threshold=0.5, max_length=64, batch_size=4)


@pytest.fixture(scope="module")
def reference():
    """The fixture imported directly, routed as ``imported``: the independent forward."""
    return from_hf(MIXTRAL, router="top_p", threshold=0.5, capacity_factor=None)


_jitted = nnx.jit(lambda model, tokens: model(tokens))


def _forward(model, ids):
    """Logits [T, V] and experts [L, T] of one sequence, padded to 64 positions after it (the
    model is causal) so that one program serves every call."""
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, : len(ids)] = ids
    logits, layers = _jitted(model, tokens)
    return np.asarray(logits[0, : len(ids)]), np.asarray(layers["token_experts"])[:, 0, : len(ids)]


def _logprob(model, context_ids, continuation_ids):
    """float64 log-probability of the continuation after the context, one full forward."""
    whole = [*context_ids, *continuation_ids]
    logits = np.asarray(_forward(model, whole[:-1])[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(continuation_ids)
    return float(logp[np.arange(len(whole) - 1 - n, len(whole) - 1), whole[-n:]].sum())


def test_a_threshold_alone_routes_an_import_by_top_p(imported):
    assert imported.source.plan.routing["router"] == "top_p"
    assert imported.source.plan.routing["threshold"] == 0.5


def test_loglikelihood_tokenises_as_lm_evals_hf_backend(imported, reference):
    """Trailing spaces of the context move to the continuation, the continuation is the tail
    of context + continuation, and an empty context is the end-of-text token."""
    args = [("Harder tasks need", " more experts"), ("Harder tasks ", "need"), ("", "tasks")]
    out = imported.loglikelihood(_requests("loglikelihood", args))
    tok = imported.tok
    expected = []
    for context, continuation in args:
        context_ids = tok.encode(context.rstrip(), special_tokens=False) or [tok.eos_id]
        whole = tok.encode(context.rstrip() + context[len(context.rstrip()):] + continuation,
                           special_tokens=False)  # fmt: skip
        continuation_ids = whole[len(context_ids) :] if context else whole
        expected.append(_logprob(reference, context_ids, continuation_ids))
    np.testing.assert_allclose([lp for lp, _ in out], expected, rtol=1e-5, atol=1e-4)
    assert all(isinstance(greedy, bool) for _, greedy in out)


def test_generate_until_equals_generate_and_stops_at_the_until_strings(imported):
    contexts = ["Harder tasks", "need more", "experts"]
    kwargs = {"until": ["e"], "max_gen_toks": 6, "do_sample": False}
    texts = imported.generate_until(_requests("generate_until", [(c, kwargs) for c in contexts]))
    tok = imported.tok
    prompts = [tok.encode(c, special_tokens=False) for c in contexts]
    gen = generate_lib.generate(imported.source.graphdef, imported.source.params, prompts, 6,
                                stop_id=tok.eos_id)  # fmt: skip
    for text, tokens in zip(texts, gen.tokens, strict=True):
        assert text == tok.decode(tokens).split("e")[0]
        assert "e" not in text


def test_sampled_generation_is_generate_at_the_temperature_with_the_seed(imported):
    kwargs = {"until": [], "max_gen_toks": 5, "do_sample": True, "temperature": 0.7}
    contexts = ["Harder tasks", "need more"]
    texts = imported.generate_until(_requests("generate_until", [(c, kwargs) for c in contexts]))
    tok = imported.tok
    prompts = [tok.encode(c, special_tokens=False) for c in contexts]
    rows = prompts + [prompts[0]] * (imported.batch_size - len(prompts))
    src = imported.source
    gen = generate_lib.generate(src.graphdef, src.params, rows, 5, temperature=0.7,
                                seed=imported.seed, stop_id=tok.eos_id)  # fmt: skip
    assert texts == [tok.decode(tokens) for tokens in gen.tokens[: len(contexts)]]
    greedy = generate_lib.generate(src.graphdef, src.params, rows, 5, stop_id=tok.eos_id)
    assert gen.tokens != greedy.tokens  # the draws are not the argmax


def test_the_experts_of_a_task_are_the_layer_metric_over_its_scored_tokens(imported, reference):
    lm = imported.with_routing()  # counters of its own
    args = [("Harder tasks", " need more experts"), ("The", " router")]
    lm.loglikelihood(_requests("loglikelihood", args[:1], task="one") +
                     _requests("loglikelihood", args[1:], task="two"))  # fmt: skip
    tok = lm.tok
    info = lm.get_model_info()["dynmoe_jax"]["tasks"]
    for task, (context, continuation) in zip(("one", "two"), args, strict=True):
        context_ids = tok.encode(context, special_tokens=False)
        whole = tok.encode(context + continuation, special_tokens=False)
        _, experts_LT = _forward(reference, whole[:-1])
        n = len(whole) - len(context_ids)
        per_layer = experts_LT[:, -n:].mean(-1)
        np.testing.assert_allclose(info[task]["experts_per_token_by_layer"], per_layer,
                                   atol=1e-4)  # fmt: skip
        assert info[task]["scored_tokens"] == n
        assert info[task]["experts_per_token"] == pytest.approx(per_layer.mean(), abs=1e-4)


def test_a_rolling_loglikelihood_is_eval_modes_loss_on_the_same_text(trained, tiny_run):
    run = trained("grouped")
    lm = DynMoELM(pretrained=str(run.workdir), batch_size=2)
    text = "The names given are all considered public."
    (rolling,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    # --mode=eval's step, on the same tokens after the end-of-text token, without capacity.
    config = tiny_run(**{"moe.dispatch": "grouped", "moe.capacity_factor": None})
    config = config_lib.check_config(config)
    restored = restore(config, run.workdir)
    ids = lm.tok.encode(text)
    assert len(ids) < config.data.seq_len
    width = config.data.seq_len
    batch = {k: np.zeros((config.data.batch_size, width), np.int32) for k in ("inputs", "targets")}
    weights = np.zeros((config.data.batch_size, width), np.float32)
    batch["inputs"][0, : len(ids)] = [lm.tok.eos_id, *ids[:-1]]
    batch["targets"][0, : len(ids)] = ids
    weights[0, : len(ids)] = 1
    batch["weights"], batch["valid"] = weights, weights > 0
    result = train_lib.evaluate(train_lib.make_eval_step(restored.task), restored.params,
                                [batch])  # fmt: skip
    np.testing.assert_allclose(-rolling, result["loss"] * len(ids), rtol=1e-5)


def test_bad_model_arguments_are_one_line():
    with pytest.raises(
        ConfigError, match=r"^moe.threshold=1.5 is invalid: allowed 0 < threshold <= 1$"
    ):
        DynMoELM(pretrained=str(MIXTRAL), threshold=1.5)
    with pytest.raises(ConfigError, match=r"^temperature=.*a model argument among"):
        DynMoELM(pretrained=str(MIXTRAL), temperature=0.1)
    with pytest.raises(ConfigError, match=r"^pretrained=.*a training workdir"):
        DynMoELM(pretrained=str(FIXTURES))
