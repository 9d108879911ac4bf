"""pretrained=PATH: a workdir or a Hugging Face folder, checked without reading a weight."""

import json

import pytest

from dynmoe_jax.lm_eval import source
from dynmoe_jax.pretrained import PretrainedError
from dynmoe_jax.validation import ConfigError
from tests.pretrained.hf_fixtures import FIXTURES

MIXTRAL = FIXTURES / "mixtral"


def test_the_kind_of_a_folder(tmp_path):
    assert source.kind_of(MIXTRAL) is source.Kind.HF
    (tmp_path / "checkpoints").mkdir()
    assert source.kind_of(tmp_path) is source.Kind.WORKDIR
    with pytest.raises(ConfigError, match="^pretrained=.* is invalid: allowed a training"):
        source.kind_of(tmp_path / "checkpoints")


def test_a_plan_for_an_import_routes_as_asked():
    plan = source.check_plan(str(MIXTRAL), {"threshold": 0.4})
    assert plan.kind is source.Kind.HF
    assert plan.routing["router"] == "top_p" and plan.routing["threshold"] == 0.4
    assert plan.model_cfg.moe.capacity_factor is None  # the router's own choice counts
    assert plan.max_length == json.loads((MIXTRAL / "config.json").read_text()).get(
        "max_position_embeddings", source.DEFAULT_HF_LENGTH)  # fmt: skip
    top_k = source.check_plan(str(MIXTRAL), {"top_k": 1, "max_k": "None"}, max_length=40)
    assert (top_k.routing["router"], top_k.routing["top_k"], top_k.max_length) == (
        "top_k", 1, 40)  # fmt: skip


def test_a_plan_refuses_what_does_not_fit(trained):
    with pytest.raises(ConfigError, match="^moe.top_k=9 is invalid"):
        source.check_plan(str(MIXTRAL), {"top_k": 9})
    with pytest.raises((ConfigError, PretrainedError), match="dtype"):
        source.check_plan(str(MIXTRAL), {}, dtype="int8")
    with pytest.raises(ConfigError, match="^max_length=1 is invalid"):
        source.check_plan(str(MIXTRAL), {}, max_length=1)
    run = trained("grouped")
    plan = source.check_plan(str(run.workdir), {"threshold": 0.3})
    assert plan.kind is source.Kind.WORKDIR and plan.max_length == run.config.data.seq_len
    assert plan.routing["threshold"] == 0.3


def test_rerouting_reuses_the_weights_with_a_graph_of_the_new_routing():
    plan = source.check_plan(str(MIXTRAL), {})
    loaded = source.load(plan)
    top_p = source.reroute(loaded, {"threshold": 0.9})
    assert top_p.params is loaded.params
    assert top_p.plan.routing["router"] == "top_p" and top_p.model_cfg.moe.threshold == 0.9
    fresh = source.load(source.check_plan(str(MIXTRAL), {"threshold": 0.9}))
    assert fresh.graphdef == top_p.graphdef
    with pytest.raises(ConfigError, match="^moe.threshold=2 is invalid"):
        source.reroute(loaded, {"threshold": 2})
