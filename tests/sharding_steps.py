"""A few train steps of the tiny model on a given mesh (shared by the sharding tests and the
multi-process worker)."""

from __future__ import annotations

import jax

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import train
from tests.runs import placed
from tests.runs import tiny_config as tiny_config_dict


def tiny_config(mesh_shape: str, data_dir: str, **overrides):
    return config_lib.resolve(tiny_config_dict(**{
        "mesh_shape": mesh_shape,
        "data_dir": data_dir,
        "warmup_steps": 0,  # so that the first update already moves the parameters
        "moe.num_experts": 8,  # divisible by every expert axis the tests use
        "moe.dispatch": "grouped",  # the expert-parallel ring; the layer tests cover the others
        **overrides,
    }))  # fmt: skip


def task_and_data(mesh_shape: str, data_dir: str, devices=None, **overrides):
    """The task of the tiny config on a mesh (``overrides`` by dotted path) and its data."""
    config = tiny_config(mesh_shape, data_dir, **overrides)
    data = data_lib.from_config(config.data)
    return train.build_task(config, data.vocab_size, devices), data


def run_steps(
    mesh_shape: str, data_dir: str, num_steps: int, devices=None, reads: dict | None = None
) -> list[float]:
    """Losses of ``num_steps`` steps; each process reads only its rows of every batch, as the
    training loop does. ``reads``, if given, receives those rows and the windows (rows of the
    host batches) this process produced."""
    config = tiny_config(mesh_shape, data_dir)
    data = data_lib.from_config(config.data)
    task = train.build_task(config, data.vocab_size, devices)
    state = train.init_state(task)
    step = train.make_train_step(task)
    rows = train.process_rows(task.batch_sharding, (config.data.batch_size, config.data.seq_len))
    losses, windows = [], 0
    with jax.set_mesh(task.mesh):
        for i in range(num_steps):
            batch = data.train_batch(i, rows)
            windows += len(batch["inputs"])
            state, metrics = step(state, placed(task, batch))
            losses.append(float(metrics["loss"]))
    if reads is not None:
        reads.update(rows=rows.tolist(), windows_read=windows)
    return losses
