"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints``.

Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save is never listed as a step. If the newest listed step still fails to restore
(a truncated or corrupted file), we report it and fall back to the one before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 3):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restores the newest readable step onto ``abstract_state``'s shapes and shardings;
        None when there is none."""
        self._manager.wait_until_finished()
        for step in reversed(self.steps()):
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                message = f"checkpoint at step {step} is unreadable ({e!r}); trying an older one"
                log.warning(message)
                print(f"warning: {message}")
                continue
            return step, state
        return None

    def read(self, step: int) -> Any:
        """One step's state as saved (numpy arrays), with no target structure."""
        return self._manager.restore(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping shardings) that Orbax restores onto."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
