"""End to end on the tiny config: train, checkpoint, resume, evaluate, sample, CLI errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from dynmoe_jax import checkpoint as ckpt_lib
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
    return c


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _params(workdir, step):
    c = ckpt_lib.Checkpointer(workdir)
    params = c.read(step)["params"]
    c.close()
    return params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("run")
    final = train.train_and_evaluate(_config(data_dir), workdir)
    return workdir, final


def test_outputs_of_a_run(trained):
    workdir, final = trained
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


def test_resume_matches_uninterrupted_run(trained, data_dir, tmp_path):
    workdir, final = trained
    expected = _params(workdir, 6)
    # Simulate a run killed after its step-3 checkpoint: drop the later checkpoint and the
    # log records after step 3 would be rewritten by the resumed run.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    again = train.train_and_evaluate(_config(data_dir), resumed)
    got = _params(resumed, 6)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-6)
    steps = [(r["split"], r["step"]) for r in _records(resumed)]
    assert len(steps) == len(set(steps)) == len(_records(workdir))


def test_eval_and_sample_modes(trained, data_dir, capsys):
    workdir, final = trained
    result = inference.evaluate_workdir(_config(data_dir), workdir)
    assert result["step"] == 6
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)
    out = inference.sample_workdir(_config(data_dir), workdir, "The ", max_new_tokens=5)
    assert len(out["tokens"]) == len(out["experts_per_token"]) <= 5
    assert all(1 <= e <= 4 for e in out["experts_per_token"])
    assert "experts per token" in capsys.readouterr().out


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


def test_gradient_accumulation_equals_full_batch(data_dir):
    # The load-balance loss is a product of batch statistics (f_i Q_i), so under accumulation
    # it is computed per micro-batch and differs slightly; every other term is a token mean.
    grads = []
    for accum in (1, 4):
        config = _config(data_dir, grad_accum_steps=accum)
        config.loss.load_balance_weight = 0.0
        data, _ = train.load_run_data(config)
        task = train.build_task(config, data.vocab_size)
        state = train.init_state(task)
        g, metrics = jax.jit(lambda p, b, t=task: train._accumulated_grads(t, p, b))(
            state["params"], data.train_batch(0)
        )
        grads.append((g, float(metrics["lm_loss"])))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *[g for g, _ in grads]
    )
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)
