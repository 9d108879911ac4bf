"""Runs from an imported checkpoint (``--config.init_from``) on the tiny fixtures of
tests/fixtures/hf: fine-tuning with a checkpoint round trip, and evaluation of the imported
weights against a float64 reference computed from the model's own outputs; the checks of the
folder and of the vocabulary."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import inference, pretrained, train
from dynmoe_jax.configs import pretrained as pretrained_config
from dynmoe_jax.data import corpora
from dynmoe_jax.pretrained import init_from
from dynmoe_jax.validation import ConfigError
from tests.pretrained.hf_fixtures import FIXTURES, broken_copy
from tests.runs import set_fields

FAMILIES = ("mixtral", "olmoe", "qwen2_moe")


def test_the_folder_and_the_vocabulary_are_checked_in_one_line(tmp_path):
    olmoe = FIXTURES / "olmoe"
    assert init_from.check_path("") == "" and init_from.check_path(str(olmoe)) == str(olmoe)
    cases = {
        str(tmp_path): f"{str(tmp_path)!r} is invalid: allowed {init_from.ALLOWED}",
        None: f"None is invalid: allowed {init_from.ALLOWED}: this config needs "
              "--config.init_from=PATH",
        3: f"3 is invalid: allowed '' (none) or {init_from.ALLOWED}",
    }  # fmt: skip
    for value, message in cases.items():
        with pytest.raises(ConfigError) as err:
            init_from.check_path(value)
        assert str(err.value) == f"init_from={message}"
    cfg = pretrained.hf_model_config(olmoe)  # a vocabulary of 128
    init_from.check_vocabulary(str(olmoe), cfg, 128)
    with pytest.raises(ConfigError) as err:
        init_from.check_vocabulary("ckpt", cfg, 129)
    assert str(err.value) == (
        "init_from='ckpt' is invalid: allowed a checkpoint whose vocab_size (128) covers the "
        "129 ids of its tokenizer.json"
    )


@pytest.fixture(scope="module")
def corpus_and_cache(tmp_path_factory):
    """A small corpus (the first 300 pydoc paragraphs) and a data cache shared by the module."""
    root = tmp_path_factory.mktemp("init_from")
    (root / "corpus").mkdir()
    text = "\n\n".join(corpora.pydoc_paragraphs()[:300])
    (root / "corpus" / "pydoc.txt").write_text(text)
    return f"text_dir:{root / 'corpus'}", str(root / "cache")


def _config(family, corpus_and_cache, **overrides):
    c = pretrained_config.get_config()
    c.init_from = str(FIXTURES / family)
    c.dataset, c.data_dir = corpus_and_cache
    c.seq_len, c.batch_size, c.eval_batches = 32, 4, 2
    c.num_train_steps, c.warmup_steps, c.learning_rate = 2, 1, 1e-3
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
    c.model.dtype, c.model.remat = "float32", "none"
    return config_lib.resolve(set_fields(c, **overrides))


@pytest.mark.slow
def test_fine_tune_saves_restores_and_resumes(corpus_and_cache, tmp_path, capsys):
    config = _config("mixtral", corpus_and_cache)
    final = train.train_and_evaluate(config, tmp_path)
    out = capsys.readouterr().out
    assert f"initialised from {FIXTURES / 'mixtral'} (imported weights)" in out
    assert (tmp_path / "checkpoints" / "2").is_dir()
    recorded = (tmp_path / "config.json").read_text()
    assert f'"init_from": "{FIXTURES / "mixtral"}"' in recorded

    run = inference.restore(config, tmp_path)
    assert (run.step, run.source) == (2, "checkpoint step 2")
    imported = jax.device_get(init_from.load_params(run.task))
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(run.params),
                         imported)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 1e-5  # two steps at 1e-3 changed the weights
    again = inference.evaluate_workdir(config, tmp_path)
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-6)

    capsys.readouterr()
    longer = dataclasses.replace(config.train, num_train_steps=3)
    train.train_and_evaluate(dataclasses.replace(config, train=longer), tmp_path)  # resumes
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'checkpoints'}/2" in out
    assert "initialised from" not in out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_eval_of_imported_weights_matches_a_float64_reference(
    family, corpus_and_cache, tmp_path, capsys
):
    config = _config(family, corpus_and_cache, **{"moe.router": "top_k"})
    result = inference.evaluate_workdir(config, tmp_path / "fresh")
    out = capsys.readouterr().out
    assert not (tmp_path / "fresh").exists()  # evaluation creates nothing

    # The reference: the imported model called directly on the same batches, the loss and
    # the experts per layer summed in float64 over the weighted positions only.
    model = pretrained.from_hf(FIXTURES / family, router="top_k")
    data = data_lib.from_config(config)
    nll, tokens, experts = 0.0, 0.0, 0.0
    for batch in data.eval_batches(config.eval_batches):
        logits, layer = model(batch["inputs"])
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        nll -= (picked * batch["weights"]).sum()
        tokens += batch["weights"].sum()
        experts += (np.asarray(layer["token_experts"], np.float64) * batch["weights"]).sum((1, 2))
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(nll / tokens), rel=1e-5)
    np.testing.assert_allclose(result["experts_per_layer"], experts / tokens, rtol=1e-6)
    # The checkpoint's own top-2 in every MoE layer (Qwen2-MoE's fixture: 1 of its 3 layers).
    num_moe = model.cfg.num_moe_layers
    np.testing.assert_array_equal(result["experts_per_layer"], [2.0] * num_moe)
    assert f"imported weights of {FIXTURES / family} on text_dir:" in out
    assert f"perplexity {result['perplexity']:.2f}" in out
    assert "experts per token by layer: " + ", ".join(["2.00"] * num_moe) in out


@pytest.mark.slow
def test_imported_weights_evaluate_the_same_on_a_mesh(corpus_and_cache, tmp_path):
    # OLMoE's fixture has 8 experts: two per device on the expert axis, the batch over all 8.
    single = _config("olmoe", corpus_and_cache, batch_size=8)
    sharded = _config("olmoe", corpus_and_cache, batch_size=8, mesh_shape="data=2,expert=4")
    run = inference.restore(sharded, tmp_path / "fresh")
    flat = jax.tree_util.tree_flatten_with_path(run.params)[0]
    experts = [w for path, w in flat if "_EDF" in jax.tree_util.keystr(path)]
    assert len(experts) == 4  # gate and up of 2 layers, each split 4 ways over the experts
    assert all(w.sharding.shard_shape(w.shape)[0] == w.shape[0] // 4 == 2 for w in experts)
    one = inference.evaluate_workdir(single, tmp_path / "fresh")
    eight = inference.evaluate_workdir(sharded, tmp_path / "fresh")
    assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)
    np.testing.assert_allclose(eight["experts_per_layer"], one["experts_per_layer"], rtol=1e-6)


# ----------------------------------------------------------------------------- early checks


def _expected(kind: str, folder: Path) -> str:
    return {
        "shard": f"{folder / 'model-00002-of-00002.safetensors'}: missing, though "
                 "model.safetensors.index.json lists it (1 of 2 shards missing)",
        "shape": f"{folder / 'model.safetensors'}:model.norm.weight.shape=(31,) is invalid: "
                 "allowed (32,) (for final_norm.scale_D)",
        "vocab=512": f"init_from={str(folder)!r} is invalid: allowed a tokenizer.json of the "
                     "checkpoint's own vocabulary: config.json's vocab_size (512) is more than "
                     "256, the padding of its tokenizer's 128 ids (a tokenizer of another "
                     "model?)",
    }[kind]  # fmt: skip


@pytest.mark.parametrize("kind", ["shard", "shape", "vocab=512"])
def test_a_broken_folder_is_refused_before_any_data_is_read(kind, tmp_path):
    folder = broken_copy(kind, tmp_path / "ckpt")
    c = pretrained_config.get_config()
    c.init_from, c.data_dir = str(folder), str(tmp_path / "cache")
    with pytest.raises(ConfigError) as err:
        config_lib.check_config(c)
    assert str(err.value) == _expected(kind, folder)
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(config_lib.resolve(c), tmp_path / "run")
    assert str(err.value) == _expected(kind, folder)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_missing_shard_is_a_pretrained_error_in_python(tmp_path):
    folder = broken_copy("shard", tmp_path / "ckpt")
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.from_hf(folder)
    assert str(err.value) == _expected("shard", folder)


def test_padding_rows_are_accepted_with_one_note(tmp_path, capsys):
    folder = broken_copy("vocab=192", tmp_path / "ckpt")  # 128 ids padded to 192 rows
    c = pretrained_config.get_config()
    c.init_from = str(folder)
    config_lib.check_config(c)
    config_lib.check_config(c)  # an unchanged folder is checked, and noted, once
    assert capsys.readouterr().err == (
        f"note: init_from={folder}: the embedding has 192 rows, the tokenizer 128 ids; the "
        "other 64 rows are padding that no text encodes to\n"
    )
    assert init_from.most_rows(128) == 256 and init_from.most_rows(40) == 128
