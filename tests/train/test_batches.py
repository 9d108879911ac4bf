"""Batches onto the mesh: the rows each process reads and each device's rows of a placed
batch."""

import numpy as np

from dynmoe_jax import train
from tests.sharding_steps import task_and_data


def test_one_process_reads_every_row(data_dir):
    task, _ = task_and_data("data=2,expert=4", data_dir)
    shape = (task.config.data.batch_size, task.config.data.seq_len)
    rows = train.process_rows(task.batch_sharding, shape)
    np.testing.assert_array_equal(rows, np.arange(task.config.data.batch_size))


def test_put_batch_gives_each_device_its_rows_and_leaves_labels_on_the_host(data_dir):
    task, _ = task_and_data("data=2,expert=4", data_dir)
    inputs = np.arange(8 * 32, dtype=np.int32).reshape(8, 32)
    batch = {"inputs": inputs, "targets": inputs + 1, "weights": np.ones((8, 32), np.float32),
             "task": np.arange(8)}  # fmt: skip
    placed = train.put_batch(task.batch_sharding, 8, batch)
    assert set(placed) == {"inputs", "targets", "weights"}  # "task" is an experiment's label
    np.testing.assert_array_equal(placed["targets"], inputs + 1)
    # Batch over (data, expert) = 8 devices: one row each, every row on exactly one device.
    shards = [np.asarray(s.data) for s in placed["inputs"].addressable_shards]
    assert [s.shape for s in shards] == [(1, 32)] * 8
    assert sorted(int(s[0, 0]) // 32 for s in shards) == list(range(8))
