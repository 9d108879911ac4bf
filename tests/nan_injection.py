"""Fault injection for the tests: training data whose batch of one chosen step has NaN weights,
so the loss and every gradient of that step are NaN, as a real overflow would make them.

The library knows nothing of this: ``train.train_with_data`` takes the wrapped data, and the
CLI below reads it where ``train_and_evaluate`` reads its corpus (``data.from_config``).

    python -m tests.nan_injection STEP --config=... --workdir=...   # the CLI, poisoned at STEP
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from dynmoe_jax import data as data_lib


class NanAt:
    """``data`` (a ``data.Data``) whose train batch of step number ``step`` (1-based) has NaN
    weights; everything else is read from ``data``."""

    def __init__(self, data: data_lib.Data, step: int):
        self.data, self.step = data, step

    def __getattr__(self, name: str):
        return getattr(self.data, name)

    def train_batch(self, index: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        batch = self.data.train_batch(index, rows)
        if index + 1 == self.step:  # batch ``index`` is read by step ``index + 1``
            batch = dict(batch, weights=batch["weights"] * np.nan)
        return batch


if __name__ == "__main__":
    from absl import app

    from dynmoe_jax import main

    poisoned_step = int(sys.argv.pop(1))
    read = data_lib.from_config
    data_lib.from_config = lambda *a, **k: NanAt(read(*a, **k), poisoned_step)
    app.run(main.main, flags_parser=main.parse_flags)
