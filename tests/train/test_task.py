"""The task of a run: the learning-rate schedule and the weight decay's mask by hand, a
checkpoint of the state's older dict form restoring as a TrainState, the one model config a
task holds, and runs from an imported checkpoint (``--config.init_from``)."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import inference, pretrained, train
from dynmoe_jax.configs import pretrained as pretrained_config
from dynmoe_jax.data import corpora
from dynmoe_jax.moe import balance
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.train import task as task_lib
from tests.pretrained.hf_fixtures import FIXTURES
from tests.runs import set_fields


def test_learning_rate_warms_up_then_decays_to_its_floor_hand_worked(tiny_run):
    # tiny: peak 1e-2, 2 warm-up steps, 6 steps, floor 0.1 of the peak.
    schedule = task_lib.learning_rate_schedule(tiny_run())
    cosine = [1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    want = [0.0, 5e-3, *cosine]  # steps 0..6: linear to the peak, then cosine to the floor
    np.testing.assert_allclose([float(schedule(s)) for s in range(7)], want, rtol=1e-5)
    assert float(schedule(100)) == pytest.approx(1e-3)


def _leaves(tree) -> dict[str, tuple[str, np.ndarray]]:
    """Each leaf by its path: (the last key, the value)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): (p[-1].key, np.asarray(v)) for p, v in flat}


def test_weight_decay_spares_norm_scales_and_the_routing_state(tiny_run):
    # With zero gradients AdamW's step is the decay alone: -lr * weight_decay * p.
    config = tiny_run(**{"warmup_steps": 0, "moe.target_k": 1.5})
    task = train.build_task(config, 64)
    params = jax.device_get(train.init_state(task).params)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = task.optimizer.update(zeros, task.optimizer.init(params), params)
    values, updates = _leaves(params), _leaves(updates)
    spared = {n for n, (key, _) in values.items() if "scale" in n or key in balance.FROZEN}
    assert any("scale" in n for n in spared) and any("threshold" in n for n in spared)
    assert len(spared) < len(values)
    for name, (_, value) in values.items():
        want = np.zeros_like(value) if name in spared else -1e-2 * 0.1 * value
        np.testing.assert_allclose(updates[name][1], want, rtol=1e-6, atol=1e-12, err_msg=name)


def test_checkpoint_of_a_dict_state_restores_as_a_train_state(tiny_run, tmp_path):
    # Before TrainState, the loop saved the state as a dict of the same fields.
    task = train.build_task(tiny_run(), 512)
    state = train.init_state(task)
    old = {"step": state.step + 7, "params": state.params, "opt_state": state.opt_state,
           "nonfinite_steps": state.nonfinite_steps,
           "first_nonfinite_step": state.first_nonfinite_step}  # fmt: skip
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    ckpt.save(7, old)
    ckpt.wait()
    step, restored = train.restore_state(task, ckpt)
    ckpt.close()
    assert step == 7 and isinstance(restored, train.TrainState) and int(restored.step) == 7
    jax.tree.map(np.testing.assert_array_equal, restored.params, jax.device_get(state.params))


def test_the_task_holds_one_model_config_with_the_datas_vocabulary(tiny_run):
    config = tiny_run()
    task = train.build_task(config, 64)
    assert config.model.vocab_size != 64 and task.config.model.vocab_size == 64
    assert task.config.model == dataclasses.replace(config.model, vocab_size=64)
    assert train.abstract_state(task).params["embed_VD"].shape[0] == 64


# ----------------------------------------------------------------------------- init_from
# Runs from an imported checkpoint (``--config.init_from``) on the tiny fixtures of
# tests/fixtures/hf: fine-tuning with a checkpoint round trip, and evaluation of the imported
# weights against a float64 reference computed from the model's own outputs.

FAMILIES = ("mixtral", "olmoe", "qwen2_moe")


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
    imported = jax.device_get(train.imported_params(run.task))
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
    data = data_lib.from_config(config.data)
    nll, tokens, experts = 0.0, 0.0, 0.0
    for batch in data.eval_batches(config.data.eval_batches):
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
