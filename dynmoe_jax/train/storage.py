"""Checkpoints on disk: the writer of one step, the space a save needs and has, and a full
disk recognised in each form it is reported in (an OSError from Python, a ValueError carrying
the OS error code from TensorStore).

Each save checks first that the filesystem has room for a checkpoint the size of the newest one
(the state's arrays before the first) and waits for its write to end, so a save that does not
fit stops the run at that step with ``CheckpointSpaceError`` naming the space needed; the
unfinished step's temporary directory is removed and every complete checkpoint is kept, so the
same command resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging


class CheckpointSpaceError(OSError):
    """A checkpoint did not fit on the workdir's filesystem; the complete ones are kept."""


def orbax_write(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
    """Writes one step and waits for it: an asynchronous write that failed would otherwise
    surface only at the next save, after training on past it."""
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()


@contextlib.contextmanager
def failures_raised_not_logged():
    """Orbax logs a failed write's traceback from each of its threads before raising the error
    in the caller; the raised error alone is reported (the save re-raises it)."""
    logger = absl_logging.get_absl_logger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def out_of_space(e: BaseException) -> bool:
    """Whether a write failed for lack of space. TensorStore reports a full disk as a
    ValueError carrying the OS error code, Python as an OSError."""
    codes = {errno.ENOSPC, errno.EDQUOT}
    if isinstance(e, OSError) and e.errno in codes:
        return True
    return any(f"os_error_code='{code}'" in str(e) for code in codes)


def tree_bytes(path: Path) -> int:
    """The bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def space_needed(directory: Path, steps: list[int], state: Any) -> int:
    """About what the next checkpoint takes: the newest of ``steps``'s size, or before the
    first, the bytes of the state's arrays."""
    if steps:
        return tree_bytes(directory / str(max(steps)))
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def discard_unfinished(directory: Path, step: int) -> None:
    """Removes Orbax's temporary directory of a step whose write failed (never listed as a step,
    and removed at the next start anyway), to give back the space it took."""
    for tmp in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def free_bytes(path: Path) -> int:
    """Free bytes of the filesystem holding ``path`` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def no_space_message(
    workdir: Path, step: int, needed: int, free: int | None, kept: int | None
) -> str:
    """The one line a save that does not fit ends the run with."""
    room = f"about {_megabytes(needed)} needed"
    if free is not None:
        room += f", {_megabytes(free)} free"
    if kept is None:
        resume = "no checkpoint is complete yet, so rerunning the same command starts over"
    else:
        resume = f"rerunning the same command resumes from the checkpoint of step {kept}"
    return (f"no space left in {workdir} for the checkpoint of step {step} ({room}); free some "
            f"space: {resume}")  # fmt: skip
