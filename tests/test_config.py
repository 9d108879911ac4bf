"""The training config: each field declared once, and what comes from the declarations: the
defaults, the command line's parsing (None included), the checks and their one-line messages,
the typed RunConfig, the routing overrides of imported checkpoints and the docs' table."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib
from dynmoe_jax.configs import default, paper, pretrained, tiny
from dynmoe_jax.model.config import FFN, Remat
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.pretrained.hf_config import allowed_overrides
from dynmoe_jax.validation import ConfigError
from tests.runs import set_fields, tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seq_len", 0, "seq_len=0 is invalid: allowed an integer >= 1"),
        ("grad_accum_steps", 3, "grad_accum_steps=3 is invalid: allowed a divisor of batch_size=8"),
        ("learning_rate", 0.0, "learning_rate=0.0 is invalid: allowed a number > 0"),
        ("nonfinite", "ignore", "nonfinite='ignore' is invalid: allowed 'skip' | 'stop'"),
        ("dataset", "", "dataset='' is invalid: allowed 'kjv' | 'pydoc' | 'text_dir:PATH' | a TFDS "
         "text dataset with a 'text' feature (e.g. 'lm1b')"),
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
        ("model.remat", True, "model.remat=True is invalid: allowed 'none' | 'full' | 'dots'"),
        ("moe.router", "top_q", "moe.router='top_q' is invalid: allowed 'top_p' | 'top_k'"),
        ("moe.threshold", 1.5, "moe.threshold=1.5 is invalid: allowed 0 < threshold <= 1"),
        ("moe.top_k", 5, "moe.top_k=5 is invalid: allowed None (not with moe.router='top_k') or "
         "1..moe.num_experts=4, or one such value per layer (comma-separated)"),
        ("moe.capacity_factor", 0.0, "moe.capacity_factor=0.0 is invalid: allowed None (no "
         "dropping) or a number > 0"),
        ("loss.dynamic_weight", -1.0,
         "loss.dynamic_weight=-1.0 is invalid: allowed a number >= 0"),
        ("vocab_size", 8, "vocab_size=8 is invalid: allowed 16..1000000"),
    ],
)  # fmt: skip
def test_each_rule_reports_one_line_in_the_one_format(key, value, message):
    config = tiny_config(**{key: value})
    with pytest.raises(ConfigError) as err:
        config_lib.resolve(config)
    assert str(err.value) == message


def test_top_k_may_be_none_except_where_top_k_routing_reads_it():
    assert config_lib.resolve(tiny_config(**{"moe.top_k": None})).moe.top_k is None  # top-p
    with pytest.raises(ConfigError) as err:
        config_lib.resolve(tiny_config(**{"moe.top_k": None, "moe.router": "top_k"}))
    assert str(err.value) == (
        "moe.top_k=None is invalid: allowed None (not with moe.router='top_k') or "
        "1..moe.num_experts=4, or one such value per layer (comma-separated)"
    )


def test_top_k_takes_one_k_per_moe_layer_from_a_comma_separated_list():
    config = config_lib.set_fields(tiny_config(**{"model.num_layers": 4, "model.moe_every": 2}),
                                   {"moe.router": "top_k", "moe.top_k": "1, 3"})  # fmt: skip
    run = config_lib.resolve(config)
    assert run.moe.top_k == (1, 3) and run.moe.per_layer
    assert [run.model.moe_layer(i).top_k for i in (1, 3)] == [1, 3]
    assert run.moe.capacity_k == 2.0 and run.moe.max_selections == 3
    recorded = json.loads(config_lib.as_dict(run).to_json())  # the run record's form: a list
    assert recorded["moe"]["top_k"] == [1, 3]
    assert config_lib.resolve(ConfigDict(recorded)).moe.top_k == (1, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe.top_k": "1,2,2"}, "moe.top_k=(1, 2, 2) is invalid: allowed one k, or 2 (one per "
         "MoE layer of model.num_layers=2 with model.moe_every=1)"),
        ({"moe.top_k": "1,5"}, "moe.top_k=(1, 5) is invalid: allowed None (not with "
         "moe.router='top_k') or 1..moe.num_experts=4, or one such value per layer "
         "(comma-separated)"),
        ({"moe.top_k": "1,two"}, "moe.top_k='1,two' is invalid: allowed None (not with "
         "moe.router='top_k') or 1..moe.num_experts, or one such value per layer "
         "(comma-separated)"),
        ({"moe.top_k": "1,2", "model.scan_layers": "true"}, "model.scan_layers=True is invalid: "
         "allowed False with one moe.top_k per layer (the scanned layers share one static k)"),
    ],
)  # fmt: skip
def test_a_per_layer_top_k_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        config = config_lib.set_fields(tiny_config(), {"moe.router": "top_k", **overrides})
        config_lib.resolve(config)
    assert str(err.value) == message


def test_every_field_is_declared_once_with_a_doc_and_passes_its_own_check():
    declarations = config_lib.declarations()
    paths = [d.path for d in declarations]
    assert len(paths) == len(set(paths)) > 45
    assert all(d.doc for d in declarations)
    # The contract of the names users type.
    for name in ("seed", "dataset", "seq_len", "batch_size", "num_train_steps", "mesh_shape",
                 "learning_rate", "moe.router", "moe.threshold", "moe.top_k", "moe.max_k",
                 "moe.num_experts", "moe.capacity_factor", "moe.expected_k", "moe.group_size",
                 "moe.dispatch"):  # fmt: skip
        assert name in paths, name
    run = config_lib.resolve(config_lib.defaults())  # every default passes its check
    assert run.moe.threshold == 0.4 and run.model.d_ff == 1024 and run.data.batch_size == 16
    assert sorted(config_lib.field_paths(default.get_config())) == sorted(paths)


def test_the_typed_config_is_frozen_and_reads_through_its_sections():
    run = config_lib.resolve(tiny.get_config())
    assert (run.data.batch_size, run.train.learning_rate, run.train.mesh_shape) == (8, 1e-2, "")
    assert run.moe is run.model.moe and run.moe.d_model == run.model.d_model == 32
    assert run.model.remat is Remat.NONE and run.model.dtype == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.data = None
    with pytest.raises(AttributeError):
        _ = run.batch_size  # one name per field: run.data.batch_size
    dense = config_lib.resolve(tiny_config(**{"model.ffn": "dense"}))
    assert dense.moe is None and dense.model.ffn is FFN.DENSE
    # The record of a run (as_dict) resolves to the same typed config.
    assert config_lib.resolve(config_lib.as_dict(run)) == run


@pytest.mark.parametrize(
    "path, text, want",
    [
        ("moe.capacity_factor", "None", None),
        ("moe.capacity_factor", "1.5", 1.5),
        ("moe.max_k", "None", None),
        ("moe.max_k", "3", 3),
        ("moe.group_size", "None", None),
        ("moe.decode_tokens", "None", None),
        ("moe.renormalize", "None", None),
        ("moe.renormalize", "true", True),
        ("eval_batches", "None", None),
        ("model.scan_layers", "True", True),
        ("learning_rate", "2e-4", 2e-4),
        ("moe.router", "top_k", "top_k"),
        ("mesh_shape", "data=2", "data=2"),
    ],
)
def test_the_command_line_sets_every_field_none_included(path, text, want):
    config = config_lib.set_fields(tiny.get_config(), {path: text})
    node = config
    for part in path.split("."):
        node = node[part]
    assert node == want and type(node) is type(want)
    config_lib.resolve(config)  # and the result is a valid config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe.treshold": "0.3"},
         "moe.treshold='0.3' is invalid: allowed a field of the config (did you mean "
         "moe.threshold?)"),
        ({"moe.top_p": "1.5"},
         "moe.top_p='1.5' is invalid: allowed a field of the config (did you mean "
         "moe.threshold?)"),
        ({"zzz": "1"},
         "zzz='1' is invalid: allowed a field of the config (see docs/configuration.md for them "
         "all)"),
        ({"moe.max_k": "x"}, "moe.max_k='x' is invalid: allowed None or 1..moe.num_experts"),
        ({"moe.threshold": "high"},
         "moe.threshold='high' is invalid: allowed 0 < threshold <= 1"),
        ({"model.scan_layers": "maybe"},
         "model.scan_layers='maybe' is invalid: allowed True | False"),
        ({"seq_len": "1.5"}, "seq_len='1.5' is invalid: allowed an integer >= 1"),
    ],
)  # fmt: skip
def test_a_bad_name_or_value_on_the_command_line_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_lib.set_fields(tiny.get_config(), overrides)
    assert str(err.value) == message


def test_import_overrides_come_from_the_declarations():
    declared = {f.name for f in dataclasses.fields(MoEConfig) if f.metadata.get("override")}
    assert declared >= {"router", "threshold", "top_k", "max_k", "capacity_factor", "dispatch"}
    assert not declared & {"num_experts", "d_model", "d_ff", "dtype"}  # the checkpoint's
    assert set(allowed_overrides()) == declared | {"dtype", "remat"}
    config = pretrained.get_config()
    overrides = config_lib.import_overrides(config)
    assert (overrides["dtype"], overrides["remat"], overrides["threshold"]) == (
        "bfloat16",
        "full",
        0.5,
    )
    # None keeps the checkpoint's value: its top_k, its renormalize (and no capacity).
    assert not {"top_k", "renormalize", "capacity_factor"} & set(overrides)


def test_a_config_that_needs_a_checkpoint_says_so_and_an_imported_one_keeps_its_shape():
    with pytest.raises(ConfigError, match=r"^init_from=None is invalid: .*needs --config"):
        config_lib.resolve(pretrained.get_config())
    # model.d_model is not read: the checkpoint gives the architecture.
    config = set_fields(pretrained.get_config(), init_from=str(FIXTURES / "olmoe"),
                        **{"model.d_model": 12345})  # fmt: skip
    run = config_lib.resolve(config)
    assert run.data.init_from == str(FIXTURES / "olmoe") and run.model.d_model != 12345
    own_k = json.loads((FIXTURES / "olmoe" / "config.json").read_text())["num_experts_per_tok"]
    assert run.moe.router.value == "top_p" and run.moe.top_k == own_k  # the checkpoint's k
    assert run.moe.renormalize is False and run.moe.capacity_factor is None  # OLMoE's own
    assert run.model.remat is Remat.FULL


def test_init_from_is_a_folder_with_config_json_in_one_line(tmp_path):
    olmoe = FIXTURES / "olmoe"
    assert config_lib.check_init_from("") == ""
    assert config_lib.check_init_from(str(olmoe)) == str(olmoe)
    allowed = config_lib.INIT_FROM_ALLOWED
    cases = {
        str(tmp_path): f"{str(tmp_path)!r} is invalid: allowed {allowed}",
        None: f"None is invalid: allowed {allowed}: this config needs --config.init_from=PATH",
        3: f"3 is invalid: allowed '' (none) or {allowed}",
    }
    for value, message in cases.items():
        with pytest.raises(ConfigError) as err:
            config_lib.check_init_from(value)
        assert str(err.value) == f"init_from={message}"


def test_the_docs_table_is_generated_from_the_declarations():
    table = config_lib.configuration_table()
    assert table == (ROOT / "docs" / "configuration.md").read_text(), (
        "docs/configuration.md drifted: python -m dynmoe_jax.config > docs/configuration.md"
    )
    for d in config_lib.declarations():
        assert f"| `{d.path}` |" in table


def test_every_field_in_the_docs_table_says_what_is_allowed():
    assert [d.path for d in config_lib.declarations() if not d.allowed.strip()] == []
    assert config_lib.by_path()["model.dtype"].allowed == "'float32' | 'bfloat16'"


def test_kv_heads_must_fit_the_model_axis_of_the_mesh():
    # Grouped-query attention splits its key/value heads over `model` like the query heads.
    run = config_lib.resolve(tiny_config(mesh_shape="model=2"))
    assert config_lib.mesh_for(run).shape["model"] == 2
    narrow = dataclasses.replace(run, model=dataclasses.replace(run.model, num_kv_heads=1))
    with pytest.raises(ConfigError) as err:
        config_lib.mesh_for(narrow)
    assert str(err.value) == (
        "model.num_kv_heads=1 is invalid: allowed a multiple of model=2, to fit the mesh "
        "{'data': 1, 'expert': 1, 'model': 2}"
    )


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
        "assert jax.device_count() == 32; print(check_config(paper.get_config()).model.num_layers)"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=32",
               JAX_PLATFORMS="cpu")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "24"
