"""workdir/config.json: the run's config and corpus, the corpus guard, what evaluating or
sampling a workdir reads from it (and says it reads), and what a resume may change."""

import dataclasses
import json

import pytest

from dynmoe_jax import config as config_lib
from dynmoe_jax.configs import default, tiny
from dynmoe_jax.train import run_record
from dynmoe_jax.validation import ConfigError


def test_round_trip_and_the_corpus_guard(tiny_run, tmp_path):
    assert run_record.load(tmp_path) is None
    run = tiny_run(**{"moe.threshold": 0.3})
    path = run_record.save(run, tmp_path, "pydoc")
    assert path == tmp_path / "config.json"
    record = json.loads(path.read_text())
    assert record["corpus"] == "pydoc" and record["config"]["moe"]["threshold"] == 0.3
    loaded = run_record.load(tmp_path)
    assert loaded.corpus == "pydoc" and config_lib.resolve(loaded.config) == run
    run_record.save(run, tmp_path, "pydoc")  # resuming on the same corpus
    with pytest.raises(ConfigError) as err:
        run_record.save(run, tmp_path, "kjv")
    assert str(err.value) == (
        f"dataset='kjv' is invalid: allowed 'pydoc', the corpus {path} records for this run"
    )
    assert json.loads(path.read_text()) == record  # the refused run wrote nothing


def test_evaluating_reads_the_run_s_routing_with_only_the_command_line_s_changes(
    tiny_run, tmp_path
):
    # A fine-tune at threshold 0.5, evaluated with a config file that says 0.4.
    run_record.save(tiny_run(**{"moe.threshold": 0.5, "moe.max_k": 3}), tmp_path, "pydoc")
    config = tiny.get_config()
    used = config_lib.resolve(run_record.config_for(tmp_path, config))
    assert (used.moe.threshold, used.moe.max_k) == (0.5, 3)
    overridden = run_record.config_for(tmp_path, config, {"moe.threshold": "0.3"})
    assert config_lib.resolve(overridden).moe.threshold == 0.3
    assert run_record.config_for(tmp_path / "none", config) is config  # no record


def test_evaluation_reads_the_recorded_corpus_without_fallback(tmp_path, capsys):
    config = default.get_config()  # dataset=kjv, fallback_dataset=pydoc
    run = config_lib.resolve(config)
    run_record.save(run, tmp_path, "pydoc")
    used = run_record.config_for(tmp_path, config)
    assert (used.dataset, used.fallback_dataset) == ("pydoc", "")
    assert (config.dataset, config.fallback_dataset) == ("kjv", "pydoc")  # not modified
    assert capsys.readouterr().err == (
        "note: using corpus=pydoc, the one this run trained on (config.json)\n"
    )
    typed = config_lib.resolve(used).data
    assert (typed.dataset, typed.fallback_dataset) == ("pydoc", "")
    run_record.save(run, tmp_path / "kjv_run", "kjv")
    used = config_lib.resolve(run_record.config_for(tmp_path / "kjv_run", config))
    assert (used.data.dataset, used.data.fallback_dataset) == ("kjv", "")  # never a silent pydoc
    assert used == dataclasses.replace(run, data=dataclasses.replace(run.data, fallback_dataset=""))
    with pytest.raises(ConfigError, match=r"^dataset='kjv' is invalid: allowed 'pydoc', the"):
        run_record.check_corpus(tmp_path, "kjv")  # what restoring another corpus meets


def test_the_recorded_fields_that_win_over_the_config_file_are_named(tiny_run, tmp_path, capsys):
    run_record.save(tiny_run(**{"moe.threshold": 0.5, "moe.max_k": 3}), tmp_path, "pydoc")
    config = tiny.get_config()
    config.data_dir = tiny_run().data.data_dir
    run_record.config_for(tmp_path, config)
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'config.json'} (the run's record) wins over --config for "
        "moe.threshold=0.5 (--config: 0.4), moe.max_k=3 (--config: None); "
        "--config.FIELD=VALUE sets one\n"
    )
    run_record.config_for(tmp_path, config, {"moe.threshold": "0.5", "moe.max_k": "3"})
    assert capsys.readouterr().err == ""


def _resumable(tiny_run, workdir, step=6):
    """A recorded run of the tiny config with a checkpoint folder of ``step``."""
    path = run_record.save(tiny_run(), workdir, "pydoc")
    (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    return path


def test_a_resume_names_and_records_the_changes_it_accepts(tiny_run, tmp_path, capsys):
    path = _resumable(tiny_run, tmp_path)
    changed = tiny_run(**{"num_train_steps": 8, "moe.threshold": 0.3})
    run_record.save(changed, tmp_path, "pydoc")
    assert capsys.readouterr().err == (
        "note: resuming from step 6 with num_train_steps 6 -> 8, moe.threshold 0.4 -> 0.3 "
        f"(recorded in {path})\n"
    )
    record = json.loads(path.read_text())
    assert record["config"]["num_train_steps"] == 8 and record["changes"] == [
        {"step": 6, "field": "num_train_steps", "old": 6, "new": 8},
        {"step": 6, "field": "moe.threshold", "old": 0.4, "new": 0.3},
    ]
    (tmp_path / "checkpoints" / "8").mkdir()
    run_record.save(changed, tmp_path, "pydoc")  # the same again: nothing new, history kept
    assert capsys.readouterr().err == "" and json.loads(path.read_text()) == record
    assert run_record.changes_on_resume(tmp_path / "fresh", changed) == []


@pytest.mark.parametrize(
    "field, value, old",
    [("model.d_model", 64, 32), ("moe.num_experts", 8, 4), ("vocab_size", 1024, 512),
     ("tokenizer", "bytes", "sentencepiece")],
)  # fmt: skip
def test_a_resume_refuses_to_change_the_model_or_its_vocabulary(
    field, value, old, tiny_run, tmp_path
):
    path = _resumable(tiny_run, tmp_path)
    before = path.read_text()
    with pytest.raises(ConfigError) as err:
        run_record.save(tiny_run(**{field: value}), tmp_path, "pydoc")
    assert str(err.value) == (
        f"{field}={value!r} is invalid: allowed {old!r}, the value {path} records: a resumed "
        "run keeps its model's shape, vocabulary and corpus (a new --workdir starts a run "
        "with another)"
    )
    assert path.read_text() == before  # nothing rewritten


def test_an_imported_run_names_only_what_a_config_file_could_set(tmp_path, capsys):
    from dynmoe_jax.configs import pretrained
    from tests.pretrained.hf_fixtures import FIXTURES

    config = pretrained.get_config()  # model.* at the defaults: the checkpoint gives them
    config.init_from = str(FIXTURES / "olmoe")
    run_record.save(config_lib.resolve(config), tmp_path, "pydoc")
    config.dataset = "pydoc"
    run_record.config_for(tmp_path, config)
    assert capsys.readouterr().err == ""
    config.moe.threshold = 0.7
    run_record.config_for(tmp_path, config)
    assert capsys.readouterr().err == (
        f"note: {tmp_path / 'config.json'} (the run's record) wins over --config for "
        "moe.threshold=0.5 (--config: 0.7); --config.FIELD=VALUE sets one\n"
    )


@pytest.mark.slow
def test_a_resumed_run_with_a_new_threshold_trains_on_and_records_it(
    trained, tiny_run, tmp_path, capsys
):
    import shutil

    from dynmoe_jax import train

    workdir = tmp_path / "run"
    shutil.copytree(trained("grouped").workdir, workdir)
    changed = tiny_run(**{"num_train_steps": 8, "moe.threshold": 0.3, "moe.dispatch": "grouped"})
    train.train_and_evaluate(changed, workdir)
    assert "note: resuming from step 6 with num_train_steps 6 -> 8, moe.threshold 0.4 -> 0.3" in (
        capsys.readouterr().err
    )
    record = json.loads((workdir / "config.json").read_text())
    assert record["config"]["moe"]["threshold"] == 0.3
    assert [(c["step"], c["field"]) for c in record["changes"]] == [
        (6, "num_train_steps"), (6, "moe.threshold")
    ]  # fmt: skip
    assert (workdir / "checkpoints" / "8").is_dir()


def test_a_run_on_its_own_data_resumes_and_the_command_line_checks_the_corpus(tiny_run, tmp_path):
    run = tiny_run()
    path = run_record.save(run, tmp_path, "synthetic")  # train_with_data: the caller's corpus
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    run_record.save(run, tmp_path, "synthetic")
    with pytest.raises(ConfigError) as err:  # a config that cannot read that corpus
        run_record.changes_on_resume(tmp_path, run)
    assert str(err.value) == (
        f"dataset='pydoc' is invalid: allowed 'synthetic', the corpus {path} records for this "
        "run (a new --workdir starts a run on another)"
    )
