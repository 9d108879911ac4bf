"""End to end on the tiny config: train, checkpoint, resume, evaluate, sample, CLI errors."""

import contextlib
import io
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import inference, train
from dynmoe_jax.configs import tiny

TRAIN_KEYS = {
    "step", "loss", "lm_loss", "load_balance_loss", "dynamic_loss", "experts_per_token",
    "experts_per_layer", "slots_per_token", "dropped_fraction", "learning_rate",
    "tokens_per_sec", "split",
}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _config(data_dir, **overrides):
    c = tiny.get_config()
    c.data_dir = data_dir
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config_lib.resolve(c)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(data_dir, workdir, step):
    run = inference.restore(_config(data_dir), workdir)
    assert run.step == step
    return run.params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        final = train.train_and_evaluate(_config(data_dir), workdir)
    return workdir, final, printed.getvalue()


def test_outputs_of_a_run(trained):
    workdir, final, _ = trained
    records = _records(workdir)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert set(train_records[0]) >= TRAIN_KEYS
    assert len(train_records[0]["experts_per_layer"]) == 2
    assert [r["step"] for r in records if r["split"] == "validation"] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in records)
    validation = [r["loss"] for r in records if r["split"] == "validation"]
    assert validation[1] < validation[0]  # it learns
    assert final["perplexity"] == pytest.approx(np.exp(final["loss"]))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3", "6",
    ]  # fmt: skip
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "experts_per_layer.png").stat().st_size > 1000


def test_end_of_run_summary_names_the_split_and_its_size(trained):
    _, final, printed = trained
    # tiny: eval_batches=2 of 8 x 32 tokens, no padding in the first two batches
    assert (final["batches"], final["tokens"]) == (2, 512.0)
    line = next(x for x in printed.splitlines() if x.startswith("final validation split"))
    assert line.startswith("final validation split, 2 batches (512 tokens): loss ")
    assert f"perplexity {final['perplexity']:.2f}" in line and "unigram baseline" in line
    # Each validation is printed when it happens: steps 3 and 6.
    steps = [x.split(":")[0] for x in printed.splitlines() if " validation split, " in x]
    assert steps == ["step 3", "step 6", "final validation split, 2 batches (512 tokens)"]


def test_resume_matches_uninterrupted_run(trained, data_dir, tmp_path):
    workdir, final, _ = trained
    expected = _params(data_dir, workdir, 6)
    # Simulate a run killed after its step-3 checkpoint: drop the later checkpoint and the
    # log records after step 3 would be rewritten by the resumed run.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    again = train.train_and_evaluate(_config(data_dir), resumed)
    got = _params(data_dir, resumed, 6)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-6)
    steps = [(r["split"], r["step"]) for r in _records(resumed)]
    assert len(steps) == len(set(steps)) == len(_records(workdir))


def test_eval_and_sample_modes(trained, data_dir, capsys):
    workdir, final, _ = trained
    result = inference.evaluate_workdir(_config(data_dir), workdir)
    assert result["step"] == 6
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)
    out = inference.sample_workdir(_config(data_dir), workdir, "The ", max_new_tokens=5)
    assert len(out["tokens"]) == len(out["experts_per_token"]) <= 5
    assert all(1 <= e <= 4 for e in out["experts_per_token"])
    assert "experts per token" in capsys.readouterr().out


def test_a_prompts_file_samples_every_prompt_as_jsonl(trained, data_dir, tmp_path):
    workdir, _, _ = trained
    config = _config(data_dir)
    prompts = ["The ", "And it came to pass that", "In"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    written = io.StringIO()
    records = inference.sample_file(config, workdir, tmp_path / "prompts.txt", 6, batch_size=2,
                                    out=written)  # fmt: skip
    lines = [json.loads(line) for line in written.getvalue().splitlines()]
    assert lines == records and [r["prompt"] for r in lines] == prompts
    for record in lines:
        assert set(record) >= {"text", "tokens", "experts_per_token", "seconds"}
        assert len(record["tokens"]) == len(record["experts_per_token"]) <= 6
        assert record["seconds"] > 0
        # Greedy: each row of a batch is what the prompt alone gives.
        alone = inference.sample_workdir(config, workdir, record["prompt"], 6)
        assert alone["tokens"] == record["tokens"] and alone["text"] == record["text"]


def test_sampling_with_temperature_is_seeded(trained, data_dir):
    workdir, _, _ = trained
    config = _config(data_dir)

    def sample(seed):
        return inference.sample_workdir(config, workdir, "The", 12, temperature=1.5, seed=seed)

    first, again, other = sample(0), sample(0), sample(1)
    assert first["tokens"] == again["tokens"] and first["text"] == again["text"]
    assert first["tokens"] != other["tokens"]
    greedy = inference.sample_workdir(config, workdir, "The", 12)
    assert greedy["tokens"] != first["tokens"]


def test_eval_of_an_empty_workdir_creates_nothing(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        inference.evaluate_workdir(_config(data_dir), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_sampled_text_keeps_the_space_after_the_prompt(data_dir):
    data = data_lib.from_config(_config(data_dir))  # the tiny config's SentencePiece model
    tokenizer = data.tokenizer
    prompt, full = "And God said", "And God said unto him"
    prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(full)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    new_ids = full_ids[len(prompt_ids) :]
    assert tokenizer.decode(new_ids) == "unto him"  # alone, the piece loses its space
    assert prompt + inference.continuation_text(tokenizer, prompt_ids, new_ids) == full


@pytest.mark.slow
def test_padded_positions_are_not_counted_in_validation_experts(data_dir):
    config = _config(data_dir)
    data = data_lib.from_config(config)
    task = train.build_task(config, data.vocab_size)
    params = train.init_state(task).params
    batch = dict(data.train_batch(0))
    weights = np.ones_like(batch["weights"])
    weights[5:] = 0.0  # three padded rows, as the last validation batch has
    weights[0, 20:] = 0.0  # and a padded tail
    batch["inputs"] = np.where(weights > 0, batch["inputs"], data.pad_id).astype(np.int32)
    batch["weights"] = weights
    result = train.evaluate(train.make_eval_step(task), params, [batch])
    _, layer = nnx.merge(task.graphdef, params)(batch["inputs"])
    experts_LBT = np.asarray(layer["token_experts"], np.float64)
    kept = weights > 0
    by_hand = [experts_BT[kept].sum() / kept.sum() for experts_BT in experts_LBT]
    np.testing.assert_allclose(result["experts_per_layer"], by_hand, rtol=1e-6)
    assert result["tokens"] == kept.sum() == 5 * 32 - 12
    every_position = experts_LBT.mean(axis=(1, 2))
    assert np.abs(every_position - by_hand).max() > 1e-3  # padding would have shifted it


@pytest.mark.slow
def test_bfloat16_training_learns_and_stays_finite(data_dir, tmp_path):
    config = _config(data_dir, **{"model.dtype": "bfloat16"})
    final = train.train_and_evaluate(config, tmp_path)
    records = _records(tmp_path)
    assert all(np.isfinite(r["loss"]) for r in records)
    validation = [r["loss"] for r in records if r["split"] == "validation"]
    assert validation[1] < validation[0] and np.isfinite(final["loss"])
    train_loss = [r["lm_loss"] for r in records if r["split"] == "train"]
    assert train_loss[-1] < train_loss[0]


@pytest.mark.slow
def test_dense_baseline_and_top_k_train(data_dir, tmp_path):
    for name, overrides in {
        "dense": {"model.ffn": "dense"},
        "top2": {"moe.router": "top_k", "moe.top_k": 2, "grad_accum_steps": 2},
    }.items():
        final = train.train_and_evaluate(
            _config(data_dir, num_train_steps=2, **overrides), tmp_path / name
        )
        assert np.isfinite(final["loss"])
        if name == "top2":
            assert final["experts_per_token"] == pytest.approx(2.0)


@pytest.mark.slow
def test_gradient_accumulation_equals_full_batch(data_dir):
    # The load-balance loss is a product of batch statistics (f_i Q_i), so under accumulation
    # it is computed per micro-batch and differs slightly; every other term is a token mean.
    grads = []
    for accum in (1, 4):
        config = _config(data_dir, grad_accum_steps=accum)
        config.loss.load_balance_weight = 0.0
        data = data_lib.from_config(config)
        task = train.build_task(config, data.vocab_size)
        state = train.init_state(task)
        g, metrics = jax.jit(lambda p, b, t=task: train._accumulated_grads(t, p, b))(
            state.params, data.train_batch(0)
        )
        grads.append((g, float(metrics["lm_loss"])))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *[g for g, _ in grads]
    )
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)
