"""Fault injection for the tests: a train step that sees a NaN loss at one chosen step.

The library's step knows nothing of this: the wrapper gives the step a batch whose weights are
NaN, so the loss and every gradient of that step are NaN, as a real overflow would make them.
``train_and_evaluate`` takes the wrapped step factory (``make_step``).

    python -m tests.nan_injection STEP --config=... --workdir=...   # the CLI, poisoned at STEP
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

from dynmoe_jax import train


def nan_at(step: int):
    """A step factory like ``train.make_train_step`` whose step number ``step`` (1-based) is
    NaN."""

    def make(task):
        train_step = train.make_train_step(task)

        def poisoned(state, batch):
            if int(state.step) + 1 == step:
                batch = dict(batch, weights=batch["weights"] * jnp.nan)
            return train_step(state, batch)

        return poisoned

    return make


if __name__ == "__main__":
    from absl import app

    from dynmoe_jax import main

    poisoned_step = int(sys.argv.pop(1))

    def run(argv):
        del argv
        main.run_mode(make_step=nan_at(poisoned_step))

    app.run(run, flags_parser=main.parse_flags)
