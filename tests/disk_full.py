"""Fault injection for the tests: Orbax's save runs out of disk space partway through one chosen
step, as a filesystem that fills during training does.

The library knows nothing of this: ``full_disk_at`` replaces Orbax's ``CheckpointManager.save``
while it is entered, and the CLI below runs inside it.

    python -m tests.disk_full STEP --config=... --workdir=...   # the CLI, the disk full at STEP
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import orbax.checkpoint as ocp

PARTIAL_BYTES = 4096  # what the failing write leaves in the step's temporary directory


@contextlib.contextmanager
def full_disk_at(step: int) -> Iterator[None]:
    """Within it, Orbax's save of ``step`` fails with ENOSPC after putting the start of a file
    in its temporary directory for that step; other steps are saved as usual."""
    save = ocp.CheckpointManager.save

    def full(manager, at: int, *args, **kwargs):
        if at != step:
            return save(manager, at, *args, **kwargs)
        partial = Path(manager.directory) / f"{at}.orbax-checkpoint-tmp" / "state" / "d" / "0"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"\0" * PARTIAL_BYTES)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))

    with mock.patch.object(ocp.CheckpointManager, "save", full):
        yield


if __name__ == "__main__":
    from absl import app

    from dynmoe_jax import main

    full_step = int(sys.argv.pop(1))
    with full_disk_at(full_step):
        app.run(main.main, flags_parser=main.parse_flags)
