"""workdir/config.json: the run's config and corpus, the corpus guard, and what evaluating or
sampling a workdir reads from it."""

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
    assert run_record.with_recorded_corpus(run, tmp_path) is run  # no record yet
    run_record.save(run, tmp_path, "pydoc")
    used = run_record.config_for(tmp_path, config)
    assert (used.dataset, used.fallback_dataset) == ("pydoc", "")
    assert (config.dataset, config.fallback_dataset) == ("kjv", "pydoc")  # not modified
    assert capsys.readouterr().out == (
        "note: using corpus=pydoc, the one this run trained on (config.json)\n"
    )
    typed = run_record.with_recorded_corpus(run, tmp_path)
    assert (typed.dataset, typed.fallback_dataset) == ("pydoc", "")
    run_record.save(run, tmp_path / "kjv_run", "kjv")
    used = run_record.with_recorded_corpus(run, tmp_path / "kjv_run")
    assert (used.dataset, used.fallback_dataset) == ("kjv", "")  # never a silent pydoc
    assert used == dataclasses.replace(run, data=dataclasses.replace(run.data, fallback_dataset=""))
