"""Expert parallelism on 8 simulated CPU devices (conftest sets them) and on 2 processes."""

import functools
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from dynmoe_jax import MoELayer, sharding, train
from dynmoe_jax import data as data_lib
from dynmoe_jax.config import as_dict, check_config, resolve
from dynmoe_jax.train import checkpoint as ckpt_lib
from dynmoe_jax.validation import ConfigError
from tests.sharding_steps import run_steps, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MESHES = ["data=2,expert=4", "data=1,expert=8", "data=8,expert=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    data_lib.from_config(tiny_config("", d))  # build the corpus cache once
    return d


def _task(mesh_shape, data_dir, devices=None, **overrides):
    config = as_dict(tiny_config(mesh_shape, data_dir))
    for k, v in overrides.items():
        *parents, name = k.split(".")
        functools.reduce(lambda c, p: c[p], parents, config)[name] = v
    config = resolve(config)
    data = data_lib.from_config(config)
    return train.build_task(config, data.vocab_size, devices), data


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


def test_each_device_holds_its_experts(data_dir):
    task, _ = _task("data=2,expert=4", data_dir)
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
        task, data = _task(mesh_shape, data_dir, devices)
        state = train.init_state(task)
        eval_step = train.make_eval_step(task)
        with jax.set_mesh(task.mesh):
            results.append(jax.device_get(eval_step(state.params, data.train_batch(0))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), *results)


COLLECTIVES = {"index": ("all-to-all",), "grouped": ("all-gather", "reduce-scatter")}


@pytest.mark.parametrize("dispatch", list(COLLECTIVES))
def test_expert_parallel_step_collectives(data_dir, dispatch):
    task, data = _task("data=2,expert=4", data_dir, **{"moe.dispatch": dispatch})
    state = train.abstract_state(task)
    batch = train.put_batch(task, data.train_batch(0))
    with jax.set_mesh(task.mesh):
        hlo = train.make_train_step(task).lower(state, batch).compile().as_text()
    for op in COLLECTIVES[dispatch]:  # index: the all-to-all of GShard; grouped: the ring
        assert hlo.count(op) >= 4, op  # dispatch and combine, forward and backward


def _layer_loss_and_grads(dispatch: str, mesh_shape: str | None):
    kw = {"threshold": 0.6, "capacity_factor": 1.1, "expected_k": 1.5, "block_size": 4}
    layer = MoELayer(rngs=nnx.Rngs(0), num_experts=8, d_model=16, d_ff=32, dispatch=dispatch, **kw)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16))

    def loss(m, v):
        y, aux = m(v)
        return jnp.sum(jnp.sin(y)), aux["dropped_fraction"]

    fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    if mesh_shape is None:
        return fn(layer, x)
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        return fn(layer, jax.device_put(x, NamedSharding(mesh, sharding.batch_spec())))


@pytest.mark.parametrize("dispatch", ["einsum", "index", "grouped"])
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_layer_under_mesh_matches_one_device(dispatch, mesh_shape):
    (loss, dropped), grads = _layer_loss_and_grads(dispatch, mesh_shape)
    (loss_1, dropped_1), grads_1 = _layer_loss_and_grads(dispatch, None)
    assert float(dropped) == float(dropped_1) > 0  # the budget (or capacity) is binding
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
    for name in ("router_DE", "w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        got, want = getattr(grads, name)[...], getattr(grads_1, name)[...]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_grouped_no_device_holds_every_token_for_every_expert():
    layer = MoELayer(rngs=nnx.Rngs(0), num_experts=8, d_model=16, d_ff=32, dispatch="grouped",
                     block_size=4, group_size=16)  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (8, 64, 16))  # 512 tokens
    mesh = sharding.make_mesh("data=2,expert=4")
    graphdef, params = nnx.split(layer)

    def loss(p, v):
        return jnp.sum(nnx.merge(graphdef, p)(v)[0])

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, sharding.batch_spec()))
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()
    sizes = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"f32\[([0-9,]*)\]", hlo)]  # fmt: skip
    every_token_every_expert = 8 * 512 * 16
    # Per device: the 4 expert peers' 16 groups of 16 tokens, a buffer of their budgets plus
    # block padding (16 * 40 + 2 local experts * 3 = 646 -> 648 rows), F = 32 wide at most.
    assert max(sizes) <= 648 * 32 < every_token_every_expert / 3


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(data_dir, tmp_path):
    task, _ = _task("data=2,expert=4", data_dir)
    state = train.init_state(task)
    ckpt = ckpt_lib.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    expected = jax.device_get(state)
    for mesh_shape, devices in [("data=4,expert=2", None), ("", jax.devices()[:1])]:
        other, _ = _task(mesh_shape, data_dir, devices)
        step, restored = ckpt.restore_latest(train.abstract_state(other))
        assert step == 1
        w = restored.params["blocks"][1]["ffn"]["w_up_EDF"]
        assert w.sharding.mesh.shape == other.mesh.shape
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    ckpt.close()


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
    batch_size = tiny_config("", data_dir).batch_size
    assert outs[0]["rows"] == list(range(batch_size // 2))
    assert outs[1]["rows"] == list(range(batch_size // 2, batch_size))
    assert [o["windows_read"] for o in outs] == [3 * batch_size // 2] * 2
    expected = run_steps("data=2,expert=4", data_dir, num_steps=3)
    for o in outs:
        np.testing.assert_allclose(o["losses"], expected, rtol=1e-5)


def test_one_process_reads_every_row_and_batch_size_splits_over_processes(data_dir):
    task, _ = _task("data=2,expert=4", data_dir)
    np.testing.assert_array_equal(train.process_rows(task), np.arange(task.config.batch_size))
    with pytest.raises(ConfigError, match=r"^batch_size=6 is invalid: allowed a multiple of the "
                       r"process count 4 \(each process reads an equal share\)$"):  # fmt: skip
        train.check_batch_split(6, process_count=4)
    train.check_batch_split(8, process_count=4)
