"""Fault injection for the tests: a train step that sees a NaN loss at one chosen step.

The library's step knows nothing of this: the wrapper gives the step a batch whose weights are
NaN, so the loss and every gradient of that step are NaN, as a real overflow would make them.

    python -m tests.nan_injection STEP --config=... --workdir=...   # the CLI, poisoned at STEP
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

from dynmoe_jax import train


def nan_at(step: int, make_train_step=train.make_train_step):
    """A drop-in for ``train.make_train_step`` whose step number ``step`` (1-based) is NaN."""

    def make(task):
        train_step = make_train_step(task)

        def poisoned(state, batch):
            if int(state.step) + 1 == step:
                batch = dict(batch, weights=batch["weights"] * jnp.nan)
            return train_step(state, batch)

        return poisoned

    return make


if __name__ == "__main__":
    from absl import app

    from dynmoe_jax import main

    train.make_train_step = nan_at(int(sys.argv.pop(1)))
    app.run(main.main)
