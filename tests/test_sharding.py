"""Sharding on 8 simulated CPU devices (conftest sets them) and on 2 processes: the mesh and
its one table of rules, experts held per device, train steps and the forward pass against one
device, sharded models (scanned layers, grouped-query heads over ``model``), and the mesh
errors raised before compiling."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from dynmoe_jax import sharding, train
from dynmoe_jax.config import as_dict, check_config
from dynmoe_jax.model.decoder import Decoder, DenseFFN
from dynmoe_jax.moe.layer import MoELayer
from dynmoe_jax.validation import ConfigError
from tests.model.decoders import IMPORTED, model_config, token_ids
from tests.sharding_steps import run_steps, task_and_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MESHES = ["data=2,expert=4", "data=1,expert=8", "data=8,expert=1"]


def test_mesh_parsing():
    assert sharding.parse_mesh_shape("data=2,expert=-1", 8) == {"data": 2, "expert": 4, "model": 1}
    assert sharding.parse_mesh_shape("", 8) == {"data": 1, "expert": 1, "model": 1}
    for bad, message in [
        ("data=2,pipe=4", "is invalid: allowed axes data, expert, model, each at most once"),
        ("data=4,expert=4", r"allowed at most the 8 devices present \(it needs 16\)"),
        ("data=-1,expert=-1", "allowed sizes >= 1, with at most one -1"),
        ("data=x", "allowed an integer size for data"),
    ]:
        with pytest.raises(sharding.MeshError, match=message):
            sharding.parse_mesh_shape(bad, 8)


def test_logical_names_map_through_the_one_table():
    assert sharding.logical_to_spec(("expert", "embed", "mlp")) == PartitionSpec(
        "expert", None, "model"
    )
    assert sharding.batch_spec() == PartitionSpec(("data", "expert"), None)
    # Mesh axes the mesh lacks are dropped: on a data-only mesh the batch is split over data.
    assert sharding.logical_to_spec(("batch", "heads"), ("data",)) == PartitionSpec("data", None)
    mesh = sharding.make_mesh("data=2,expert=4")
    assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    assert sharding.data_parallel_size(mesh) == 8


def test_each_device_holds_its_experts(data_dir):
    task, _ = task_and_data("data=2,expert=4", data_dir)
    state = train.init_state(task)
    w = state.params["blocks"][0]["ffn"]["w_gate_EDF"]
    assert w.shape == (8, 32, 32)
    assert w.sharding.spec == jax.sharding.PartitionSpec("expert", None, "model")
    shard_shapes = {s.data.shape for s in w.addressable_shards}
    assert shard_shapes == {(2, 32, 32)}  # 8 experts over expert=4
    # Each expert slice lives on the 2 devices of one `expert` coordinate (the data replicas).
    experts_on = {s.device.id: s.index[0] for s in w.addressable_shards}
    assert len(set(map(str, experts_on.values()))) == 4
    mu = state.opt_state[1][0].mu["blocks"][0]["ffn"]["w_gate_EDF"]
    assert {s.data.shape for s in mu.addressable_shards} == {(2, 32, 32)}


def _one_device_reference(data_dir):
    return run_steps("", data_dir, num_steps=3, devices=jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_train_steps_match_single_device(data_dir, mesh_shape):
    expected = _one_device_reference(data_dir)
    got = run_steps(mesh_shape, data_dir, num_steps=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_forward_matches_single_device(data_dir):
    results = []
    for mesh_shape, devices in [("", jax.devices()[:1]), ("data=2,expert=4", None)]:
        task, data = task_and_data(mesh_shape, data_dir, devices)
        state = train.init_state(task)
        eval_step = train.make_eval_step(task)
        with jax.set_mesh(task.mesh):
            results.append(jax.device_get(eval_step(state.params, data.train_batch(0))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), *results)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"mesh_shape": "data=2,expert=3", "batch_size": 12},
            "moe.num_experts=8 is invalid: allowed a multiple of expert=3",
        ),
        ({"mesh_shape": "data=4,expert=4"}, "it needs 16"),
        (
            {"mesh_shape": "data=8", "batch_size": 12},
            "batch_size=12 is invalid: allowed a multiple of",
        ),
        ({"mesh_shape": "model=8"}, "model.num_heads=2 is invalid: allowed a multiple of model=8"),
    ],
)
def test_mesh_errors_before_compiling(overrides, message):
    config = as_dict(tiny_config("", "unused"))
    for k, v in overrides.items():
        config[k] = v
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_the_batch_splits_evenly_over_the_processes():
    mesh = sharding.make_mesh("")
    sizes = dict(num_experts=None, num_heads=2, d_ff=8, expert_d_ff=None)
    with pytest.raises(ConfigError) as err:
        sharding.check_fits(mesh, batch_size=6, process_count=4, **sizes)
    assert str(err.value) == (
        "batch_size=6 is invalid: allowed a multiple of the process count 4 (each process "
        "reads an equal share)"
    )
    sharding.check_fits(mesh, batch_size=8, process_count=4, **sizes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(data_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multiprocess_worker",
                str(i),
                str(port),
                data_dir,
                str(tmp_path / f"p{i}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    outs = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [(o["devices"], o["local_devices"]) for o in outs] == [(8, 4), (8, 4)]
    # Each process read only its half of every batch: 3 steps x batch_size / 2 windows.
    batch_size = tiny_config("", data_dir).data.batch_size
    assert outs[0]["rows"] == list(range(batch_size // 2))
    assert outs[1]["rows"] == list(range(batch_size // 2, batch_size))
    assert [o["windows_read"] for o in outs] == [3 * batch_size // 2] * 2
    expected = run_steps("data=2,expert=4", data_dir, num_steps=3)
    for o in outs:
        np.testing.assert_allclose(o["losses"], expected, rtol=1e-5)


def test_scanned_parameters_carry_the_layers_axis_replicated():
    model = Decoder(model_config(num_layers=5, moe_every=2, scan_layers=True), rngs=nnx.Rngs(0))
    specs = sharding.param_specs(model)
    wq = model.scan_blocks.blocks[1].attn.wq_DNH
    assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert specs["scan_blocks"]["blocks"][1]["ffn"]["w_gate_EDF"] == PartitionSpec(
        None, "expert", None, "model"
    )
    assert isinstance(model.scan_blocks.blocks[1].ffn, MoELayer)
    assert isinstance(model.scan_blocks.blocks[0].ffn, DenseFFN)
    assert isinstance(model.tail_blocks[0].ffn, DenseFFN)


def test_grouped_query_attention_split_over_the_model_axis_matches_one_device():
    model = Decoder(model_config(**{**IMPORTED, "num_layers": 2}), rngs=nnx.Rngs(0))
    tokens = token_ids(batch=4)
    want, _ = model(tokens)
    mesh = sharding.make_mesh("data=2,model=2")
    specs = sharding.param_specs(model)
    assert specs["blocks"][0]["attn"]["wk_DJH"] == PartitionSpec(None, "model", None)
    graphdef, params = nnx.split(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(params), sharding.named(mesh, specs))
    nnx.replace_by_pure_dict(params, placed)
    with jax.set_mesh(mesh):
        got, _ = nnx.jit(lambda m, t: m(t))(nnx.merge(graphdef, params), tokens)
    assert got.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scanned_layers_sharded_over_experts_and_model_match_one_device():
    model = Decoder(model_config(num_layers=5, moe_every=2, scan_layers=True), rngs=nnx.Rngs(0))
    tokens = token_ids(batch=4)
    want, want_layer = model(tokens)
    mesh = sharding.make_mesh("data=2,expert=2,model=2")
    specs = sharding.param_specs(model)
    graphdef, params = nnx.split(model, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(params), sharding.named(mesh, specs))
    nnx.replace_by_pure_dict(params, placed)
    with jax.set_mesh(mesh):
        got, layer = nnx.jit(lambda m, t: m(t))(nnx.merge(graphdef, params), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer["experts_per_token"], want_layer["experts_per_token"],
                               rtol=1e-6)  # fmt: skip
