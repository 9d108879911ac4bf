"""Evaluating and sampling a workdir: the trained tiny run in both dispatch modes evaluated and
sampled, a prompts file as JSON lines equal to each prompt alone, seeded temperature, the
prompt's trailing space, and arguments checked before the workdir is read."""

import io
import json

import pytest

from dynmoe_jax import data as data_lib
from dynmoe_jax import inference
from dynmoe_jax.configs import tiny
from dynmoe_jax.validation import ConfigError
from tests.runs import DISPATCHES


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_eval_and_sample_modes(trained, dispatch, capsys):
    run = trained(dispatch)
    workdir, final = run.workdir, run.final
    result = inference.evaluate_workdir(run.config, workdir)
    assert result["step"] == 6
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)
    out = inference.sample_workdir(run.config, workdir, "The ", max_new_tokens=5)
    assert len(out["tokens"]) == len(out["experts_per_token"]) <= 5
    assert all(1 <= e <= 4 for e in out["experts_per_token"])
    assert "experts per token" in capsys.readouterr().out


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_a_prompts_file_samples_every_prompt_as_jsonl(trained, dispatch, tmp_path):
    run = trained(dispatch)
    workdir, config = run.workdir, run.config
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


def test_sampling_with_temperature_is_seeded(trained):
    run = trained("grouped")
    workdir, config = run.workdir, run.config

    def sample(seed):
        return inference.sample_workdir(config, workdir, "The", 12, temperature=1.5, seed=seed)

    first, again, other = sample(0), sample(0), sample(1)
    assert first["tokens"] == again["tokens"] and first["text"] == again["text"]
    assert first["tokens"] != other["tokens"]
    greedy = inference.sample_workdir(config, workdir, "The", 12)
    assert greedy["tokens"] != first["tokens"]


def test_eval_of_an_empty_workdir_creates_nothing(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        inference.evaluate_workdir(tiny_run(), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_sampled_text_keeps_the_space_after_the_prompt(tiny_run):
    data = data_lib.from_config(tiny_run().data)  # the tiny config's SentencePiece model
    tokenizer = data.tokenizer
    prompt, full = "And God said", "And God said unto him"
    prompt_ids, full_ids = tokenizer.encode(prompt), tokenizer.encode(full)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    new_ids = full_ids[len(prompt_ids) :]
    assert tokenizer.decode(new_ids) == "unto him"  # alone, the piece loses its space
    assert prompt + inference.continuation_text(tokenizer, prompt_ids, new_ids) == full


def test_sample_workdir_checks_its_arguments_before_reading_the_workdir(tmp_path):
    config = tiny.get_config()
    with pytest.raises(ConfigError, match="^max_new_tokens=0 is invalid"):
        inference.sample_workdir(config, tmp_path / "absent", "The", max_new_tokens=0)
    with pytest.raises(ConfigError, match="^temperature=-1 is invalid"):
        inference.sample_workdir(config, tmp_path / "absent", "The", temperature=-1)
    with pytest.raises(ConfigError, match="^--prompts_file="):
        inference.sample_file(config, tmp_path / "absent", tmp_path / "none.txt", 4)
    assert not (tmp_path / "absent").exists()


def test_a_prompts_file_writes_json_lines_alone_on_stdout(trained, tmp_path, capsys):
    run = trained("grouped")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "The "}\n\n{"prompt": "In", "id": 3}\n')
    records = inference.sample_file(run.config, run.workdir, tmp_path / "prompts.jsonl", 4,
                                    ignore_eos=True)  # fmt: skip
    captured = capsys.readouterr()
    # What loading the data and the model prints goes to stderr, not between the records.
    assert [json.loads(line) for line in captured.out.splitlines()] == records
    assert [r["prompt"] for r in records] == ["The ", "In"]
    assert f"prompts: 2 from {tmp_path / 'prompts.jsonl'} (JSON Lines)" in captured.err
    assert "data: cache" in captured.err
    # No stop token: every row has exactly max_new_tokens.
    assert [len(r["tokens"]) for r in records] == [4, 4]
    assert all(len(r["experts_per_token"]) == 4 for r in records)


def test_ignore_eos_generates_exactly_max_new_tokens(trained):
    run = trained("grouped")
    out = inference.sample_workdir(run.config, run.workdir, "The", 7, temperature=2.0, seed=1,
                                   ignore_eos=True)  # fmt: skip
    assert len(out["tokens"]) == len(out["experts_per_token"]) == 7
