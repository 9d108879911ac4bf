"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints``.

Crash safety:
* Orbax writes each step to a temporary directory and renames it when complete, so a save cut
  by a crash is never listed as a step; leftover temporary directories are removed at start-up.
* Each checkpoint carries a fingerprint (the sum of every array). A checkpoint that fails to
  read, or whose values do not match its fingerprint (truncated or corrupted files), is
  reported, moved aside to ``WORKDIR/checkpoints_unreadable/`` (nothing is deleted) and the
  previous step is used.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's values do not match the fingerprint written with it."""


def fingerprint(state: Any) -> list[float]:
    """Sum of each array of the state (float32 on device, cheap), in tree order."""
    sums = [jnp.sum(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(state)]
    return [float(s) for s in jax.device_get(sums)]


def _matches(expected: list[float], got: list[float]) -> bool:
    # Another mesh sums in another order, so allow float32 rounding, nothing more.
    e, g = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    return e.shape == g.shape and bool(np.all(np.abs(e - g) <= 1e-4 * (1.0 + np.abs(e))))


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self._keep = keep
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=True, cleanup_tmp_directories=True
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            fingerprint=ocp.args.JsonSave(fingerprint(state)),
        )
        self._manager.save(step, args=args, force=True)

    def _restore(self, step: int, abstract_state: Any | None) -> Any:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            fingerprint=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        if not _matches(restored.fingerprint, fingerprint(restored.state)):
            raise CorruptCheckpointError(f"values of step {step} do not match its fingerprint")
        return restored.state

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restores the newest readable step onto ``abstract_state``'s shapes and shardings;
        None when there is none."""
        self._manager.wait_until_finished()
        for step in reversed(self.steps()):
            try:
                return step, self._restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                reason = str(e).splitlines()[0][:200]
                self._set_aside(step, f"{type(e).__name__}: {reason}")
        return None

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves an unreadable step out of the manager's sight, keeping its files."""
        target = self.workdir / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), target)
        print(f"warning: checkpoint at step {step} is unreadable ({reason}); moved to {target}; "
              "trying an older one")  # fmt: skip
        self._manager.close()
        self._manager = self._open()

    def read(self, step: int) -> Any:
        """One step's state as saved (numpy arrays), with no target structure."""
        return self._restore(step, None)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
