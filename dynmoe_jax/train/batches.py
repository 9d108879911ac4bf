"""Batches onto the mesh: which rows each process reads, and placing them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding

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


def process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of the global batch of ``shape`` (rows first) placed by ``sharding`` that this
    process's devices hold, ascending: the only rows it reads (all of them with one process).
    ``make_array_from_process_local_data`` takes them concatenated in this order."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def put_batch(sharding: NamedSharding, batch_size: int, batch: Batch) -> dict[str, jax.Array]:
    """Places a batch onto the mesh by ``sharding``: either this process's rows of the global
    batch of ``batch_size`` rows (those of ``process_rows``, in that order) or the whole global
    batch, the same on every process, of which each process keeps its own rows. Keys other
    than ``BATCH_KEYS`` (labels an experiment carries along) stay on the host."""
    if jax.process_count() == 1:  # every row is local: the batch is the global array
        # make_array_from_callback: cheaper than make_array_from_process_local_data for the
        # same array (experiments/RESULTS.md, data pipeline).
        return {
            k: jax.make_array_from_callback(
                batch[k].shape, sharding, lambda idx, v=batch[k]: v[idx]
            )
            for k in BATCH_KEYS
            if k in batch
        }
    rows = process_rows(sharding, (batch_size, *batch["inputs"].shape[1:]))
    local = batch
    if len(batch["inputs"]) == batch_size:
        local = {k: batch[k][rows] for k in BATCH_KEYS if k in batch}
    elif len(batch["inputs"]) != len(rows):
        raise ValueError(f"a batch of {len(batch['inputs'])} rows is neither the global batch "
                         f"({batch_size}) nor this process's {len(rows)} rows")  # fmt: skip
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(local[k]), (batch_size, *local[k].shape[1:])
        )
        for k in BATCH_KEYS
        if k in local
    }
