"""The config module: rules and their one-line messages, the frozen configs, the field-name
check behind the command line, the run record in workdir/config.json, and configs/paper.py."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax.configs import default, paper, tiny
from dynmoe_jax.data import corpora
from dynmoe_jax.model.layer_stack import Remat
from dynmoe_jax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _set(config, key, value):
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return config


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seq_len", 0, "seq_len=0 is invalid: allowed an integer >= 1"),
        ("grad_accum_steps", 3, "grad_accum_steps=3 is invalid: allowed a divisor of 8"),
        ("learning_rate", 0.0, "learning_rate=0.0 is invalid: allowed a number > 0"),
        ("nonfinite", "ignore", "nonfinite='ignore' is invalid: allowed 'skip' | 'stop'"),
        ("dataset", "", "dataset='' is invalid: allowed kjv | pydoc | text_dir:PATH | a TFDS name"),
        ("model.dtype", "float16",
         "model.dtype='float16' is invalid: allowed 'float32' | 'bfloat16'"),
        ("model.ffn", "rnn", "model.ffn='rnn' is invalid: allowed 'moe' | 'dense'"),
        ("model.num_heads", 3,
         "model.num_heads=3 is invalid: allowed an integer >= 1 dividing model.d_model=32"),
        ("model.num_heads", 32,
         "model.num_heads=32 is invalid: allowed a divisor of model.d_model=32 giving an even "
         "head width"),
        ("model.moe_every", 3, "model.moe_every=3 is invalid: allowed 1..model.num_layers=2"),
        ("model.remat", "dot", "model.remat='dot' is invalid: allowed 'none' | 'full' | 'dots'"),
        ("model.remat", 1, "model.remat=1 is invalid: allowed 'none' | 'full' | 'dots'"),
        ("moe.router", "top_q", "moe.router='top_q' is invalid: allowed 'top_p' | 'top_k'"),
        ("moe.threshold", 1.5, "moe.threshold=1.5 is invalid: allowed 0 < threshold <= 1"),
    ],
)  # fmt: skip
def test_each_rule_reports_one_line_in_the_one_format(key, value, message):
    config = _set(tiny.get_config(), key, value)
    with pytest.raises(ConfigError) as err:
        config_lib.check_config(config)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "value, want", [(False, Remat.NONE), (True, Remat.FULL), ("none", Remat.NONE),
                    ("full", Remat.FULL), ("dots", Remat.DOTS)],
)  # fmt: skip
def test_remat_policies_and_the_booleans_of_earlier_configs(value, want):
    config = _set(tiny.get_config(), "model.remat", value)
    config_lib.check_config(config)
    assert config_lib.model_config(config, 64).remat is want


def test_scan_layers_reaches_the_model_and_older_configs_run_per_layer():
    config = _set(tiny.get_config(), "model.scan_layers", True)
    assert config_lib.model_config(config, 64).scan_layers is True
    del config.model["scan_layers"]  # a config.json recorded before the field existed
    assert config_lib.model_config(config, 64).scan_layers is False
    assert paper.get_config().model.scan_layers is True


def test_check_config_only_checks_and_builders_give_frozen_configs():
    config = tiny.get_config()
    assert config_lib.check_config(config) is None
    model_cfg = config_lib.model_config(config, vocab_size=300)
    assert (model_cfg.vocab_size, model_cfg.d_model, model_cfg.dtype) == (300, 32, jnp.float32)
    assert model_cfg.moe.num_experts == 4 and model_cfg.moe.threshold == 0.4
    with pytest.raises(AttributeError):
        model_cfg.moe.threshold = 0.5  # frozen
    dense = _set(tiny.get_config(), "model.ffn", "dense")
    assert config_lib.moe_config(dense) is None
    assert config_lib.model_config(dense, 300).moe is None


def test_kv_heads_must_fit_the_model_axis_of_the_mesh():
    # Grouped-query attention splits its key/value heads over `model` like the query heads.
    config = _set(tiny.get_config(), "mesh_shape", "model=2")
    model_cfg = config_lib.model_config(config, vocab_size=300)
    assert config_lib.mesh_for(config, model_cfg).shape["model"] == 2
    with pytest.raises(ConfigError) as err:
        config_lib.mesh_for(config, dataclasses.replace(model_cfg, num_kv_heads=1))
    assert str(err.value) == (
        "model.num_kv_heads=1 is invalid: allowed a multiple of model=2, to fit the mesh "
        "{'data': 1, 'expert': 1, 'model': 2}"
    )


def test_test_hooks_are_not_config_fields():
    assert "inject_nan_at_step" not in default.get_config()
    assert "inject_nan_at_step" not in config_lib.RULES


def test_paper_config_on_8_devices_names_the_mesh_it_needs():
    with pytest.raises(ConfigError) as err:
        config_lib.check_config(paper.get_config())
    assert str(err.value) == (
        "mesh_shape='data=-1,expert=16' is invalid: allowed sizes whose product divides the 8 "
        "devices present"
    )


def test_paper_config_passes_check_config_on_the_devices_its_mesh_needs():
    # Its mesh has expert=16, so the check runs in a process with 32 simulated CPU devices
    # (data=2 x expert=16): real devices, the same code path as on a 32-chip slice.
    script = (
        "import jax; from dynmoe_jax.config import check_config; "
        "from dynmoe_jax.configs import paper; "
        "assert jax.device_count() == 32; print(check_config(paper.get_config()))"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=32",
               JAX_PLATFORMS="cpu")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None"


def test_unknown_field_suggests_the_nearest_name():
    config = default.get_config()
    config_lib.check_overrides(config, {"moe.threshold": "0.3", "model.remat": ""})
    with pytest.raises(ConfigError) as err:
        config_lib.check_overrides(config, {"seed": "1", "moe.treshold": "0.3"})
    assert str(err.value) == (
        "moe.treshold='0.3' is invalid: allowed a field of the config (did you mean moe.threshold?)"
    )
    with pytest.raises(ConfigError) as err:
        config_lib.check_overrides(config, {"zzz": "1"})
    assert str(err.value) == (
        "zzz='1' is invalid: allowed a field of the config (see the config file for them all)"
    )
    assert "moe.threshold" in config_lib.field_paths(config)


def test_run_record_round_trip_and_corpus_guard(tmp_path):
    assert config_lib.load_run_config(tmp_path) is None
    config = tiny.get_config()
    path = config_lib.save_run_config(config, tmp_path, "pydoc")
    assert path == tmp_path / "config.json"
    record = json.loads(path.read_text())
    assert record["corpus"] == "pydoc" and record["config"]["moe"]["threshold"] == 0.4
    run = config_lib.load_run_config(tmp_path)
    assert run.corpus == "pydoc" and run.config.to_dict() == json.loads(config.to_json())
    config_lib.save_run_config(config, tmp_path, "pydoc")  # resuming on the same corpus
    with pytest.raises(ConfigError) as err:
        config_lib.save_run_config(config, tmp_path, "kjv")
    assert str(err.value) == (
        f"dataset='kjv' is invalid: allowed 'pydoc', the corpus {path} records for this run"
    )


def test_fallback_corpus_is_recorded_in_config_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)  # no `bible` command
    config = tiny.get_config()
    config.update(dict(dataset="kjv", fallback_dataset="pydoc", tokenizer="bytes",
                       data_dir=str(tmp_path / "cache")))  # fmt: skip
    data = data_lib.from_config(config)
    assert (data.config.dataset, data.requested_dataset) == ("pydoc", "kjv")
    # The warning's text is checked in test_data; here, that the fallback is recorded.
    assert "fallback_dataset=pydoc" in capsys.readouterr().out
    assert "corpus=pydoc (fallback_dataset: dataset=kjv is not installed)" in data.summary()
    config_lib.save_run_config(config, tmp_path / "run", data.config.dataset)
    run = config_lib.load_run_config(tmp_path / "run")
    assert (run.corpus, run.config.dataset, run.config.fallback_dataset) == (
        "pydoc",
        "kjv",
        "pydoc",
    )


def test_evaluation_reads_the_recorded_corpus_without_fallback(tmp_path, capsys):
    config = default.get_config()  # dataset=kjv, fallback_dataset=pydoc
    assert config_lib.with_recorded_corpus(config, tmp_path) is config  # no record yet
    config_lib.save_run_config(config, tmp_path, "pydoc")
    used = config_lib.with_recorded_corpus(config, tmp_path)
    assert (used.dataset, used.fallback_dataset) == ("pydoc", "")
    assert (config.dataset, config.fallback_dataset) == ("kjv", "pydoc")  # not modified
    assert capsys.readouterr().out == (
        "note: using corpus=pydoc, the one this run trained on (config.json)\n"
    )
    config_lib.save_run_config(config, tmp_path / "kjv_run", "kjv")
    used = config_lib.with_recorded_corpus(config, tmp_path / "kjv_run")
    assert (used.dataset, used.fallback_dataset) == ("kjv", "")  # never a silent pydoc
