"""Fault injection for the tests: a checkpoint writer that runs out of disk space partway
through one chosen step, as a filesystem that fills during training does.

The library's writer knows nothing of this: ``train_and_evaluate(write_checkpoint=...)`` and
``Checkpointer(write=...)`` take the wrapped writer.

    python -m tests.disk_full STEP --config=... --workdir=...   # the CLI, the disk full at STEP
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from dynmoe_jax.train import storage

PARTIAL_BYTES = 4096  # what the failing write leaves in the step's temporary directory


def full_disk_at(step: int):
    """A writer like ``storage.orbax_write`` whose write of ``step`` fails with ENOSPC after
    putting the start of a file in Orbax's temporary directory for that step."""

    def write(manager, at: int, args) -> None:
        if at != step:
            storage.orbax_write(manager, at, args)
            return
        partial = Path(manager.directory) / f"{at}.orbax-checkpoint-tmp" / "state" / "d" / "0"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"\0" * PARTIAL_BYTES)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))

    return write


if __name__ == "__main__":
    from absl import app

    from dynmoe_jax import main

    full_step = int(sys.argv.pop(1))

    def run(argv):
        del argv
        main.run_mode(write_checkpoint=full_disk_at(full_step))

    app.run(run, flags_parser=main.parse_flags)
