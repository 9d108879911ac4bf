"""Batches onto the mesh: which rows each process reads, and placing them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import jax
import numpy as np

from dynmoe_jax.validation import check

if TYPE_CHECKING:  # task.py checks batch splits with this module
    from dynmoe_jax.train.task import Task


Batch = dict[str, np.ndarray]


class RunData(Protocol):
    """What the loop reads from its data (``data.Data`` or any other source). ``rows``: only
    these rows of each global batch, in this order (those this process's devices hold; None:
    all); a source may return the whole global batch instead, which ``put_batch`` also takes."""

    vocab_size: int

    def train_batch(self, step: int, rows: Sequence[int] | None = None) -> Batch: ...

    def eval_batches(
        self, max_batches: int | None = None, rows: Sequence[int] | None = None
    ) -> Iterable[Batch]: ...

    def unigram_cross_entropy(self, max_batches: int | None = None) -> float: ...

    def summary(self) -> str: ...


# "valid" (optional): the input positions that are not padding; a batch without it has none.
BATCH_KEYS = ("inputs", "targets", "weights", "valid")


def check_batch_split(batch_size: int, process_count: int | None = None) -> None:
    """Each process reads its own share of every batch: ``batch_size`` must divide evenly."""
    count = jax.process_count() if process_count is None else process_count
    allowed = f"a multiple of the process count {count} (each process reads an equal share)"
    check(batch_size % count == 0, "batch_size", batch_size, allowed)


def process_rows(task: Task) -> np.ndarray:
    """Rows of the global batch that this process's devices hold, ascending: the only rows
    it reads (all of them with one process). ``make_array_from_process_local_data`` takes
    them concatenated in this order."""
    shape = (task.config.batch_size, task.config.seq_len)
    rows: set[int] = set()
    for index in task.batch_sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def put_batch(task: Task, batch: Batch) -> dict[str, jax.Array]:
    """Places a batch onto the mesh: either this process's rows of the global batch (those of
    ``process_rows``, in that order) or the whole global batch, the same on every process, of
    which each process keeps its own rows. Keys other than ``BATCH_KEYS`` (labels an experiment
    carries along) stay on the host."""
    if jax.process_count() == 1:  # every row is local: the batch is the global array
        # make_array_from_callback: cheaper than make_array_from_process_local_data for the
        # same array (experiments/RESULTS.md, data pipeline).
        return {
            k: jax.make_array_from_callback(
                batch[k].shape, task.batch_sharding, lambda idx, v=batch[k]: v[idx]
            )
            for k in BATCH_KEYS
            if k in batch
        }
    rows, size = process_rows(task), task.config.batch_size
    local = batch
    if len(batch["inputs"]) == size:
        local = {k: batch[k][rows] for k in BATCH_KEYS if k in batch}
    elif len(batch["inputs"]) != len(rows):
        raise ValueError(f"a batch of {len(batch['inputs'])} rows is neither the global batch "
                         f"({size}) nor this process's {len(rows)} rows")  # fmt: skip
    return {
        k: jax.make_array_from_process_local_data(
            task.batch_sharding, np.asarray(local[k]), (size, *local[k].shape[1:])
        )
        for k in BATCH_KEYS
        if k in local
    }

