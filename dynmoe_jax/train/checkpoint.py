"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints``.

Crash safety:
* Orbax writes each step to a temporary directory and renames it when complete, so a save cut
  by a crash is never listed as a step; leftover temporary directories are removed at start-up.
* Each checkpoint carries a small JSON record: the layout of the state (path -> shape and
  dtype) and a fingerprint (a 64-bit hash of each array's exact bits, independent of the mesh,
  so a flipped byte anywhere is caught). A checkpoint that fails to read, or whose values do
  not match its fingerprint (truncated or corrupted files), is reported, moved aside to
  ``WORKDIR/checkpoints_unreadable/`` (nothing is deleted) and the previous step is used.
* A checkpoint written with the layers one by one (``blocks.{i}``) restores into a model with
  scanned layers: it is read in its own layout and its blocks are stacked (``layer_stack``).
  The reverse is refused in one line naming the setting to use.
* A checkpoint whose layout differs from the model being restored was written by another
  config, and one whose record has another format was written by another release: both are
  refused with a one-line error and left in place.
* Orbax reads the arrays of a restore concurrently and, when one read fails, closes its event
  loop while the others are still in flight; their completions then reach a closed loop and
  are printed as "Event loop is closed". So before Orbax reads a step, ``_check_stored_values``
  reads the last byte of every value the step's database holds (a truncated or missing file
  fails there), on an event loop of its own that waits for every read before it closes. Bytes
  that are all present but do not decode still fail inside Orbax, and may still print so.
* Orbax's own record of a step (``_CHECKPOINT_METADATA``: timestamps, handler names) is not
  needed to restore it; an unreadable one, which Orbax would log as an error on every start,
  is moved aside and replaced by an empty record, with one warning line. A missing one, which
  Orbax would warn about on every start, is replaced by an empty record with one warning line.
* A full disk: a save that does not fit (checked first, or failing partway) stops the run at
  that step with ``CheckpointSpaceError``; every complete checkpoint is kept (``storage.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec

from dynmoe_jax.model import layer_stack
from dynmoe_jax.train.storage import (
    CheckpointSpaceError,
    discard_unfinished,
    failures_raised_not_logged,
    free_bytes,
    no_space_message,
    orbax_write,
    out_of_space,
    space_needed,
)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's values do not match the fingerprint written with it."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint was written for another model or optimizer (another config), or by
    a release whose checkpoint record this one does not read."""


def _layout(tree: Any) -> dict[str, list]:
    """Path -> [shape, dtype] of every array; paths normalised so dict keys 0 and '0' agree."""

    def name(key) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {
        ".".join(name(k) for k in path): [list(leaf.shape), str(np.dtype(leaf.dtype))]
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _mismatch(saved: dict, wanted: dict) -> str | None:
    """A short description of how two layouts differ, or None when they agree."""
    if saved == wanted:
        return None
    missing = sorted(set(wanted) - set(saved))[:3]
    extra = sorted(set(saved) - set(wanted))[:3]
    shapes = [f"{k}: saved {saved[k]} vs {wanted[k]}" for k in sorted(set(saved) & set(wanted))
              if saved[k] != wanted[k]][:3]  # fmt: skip
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
    return "; ".join(p for p in [*parts, *shapes] if p)


def _within(saved: dict, keep: set[str] | None, partial: bool, by_prefix: bool = False) -> dict:
    """The entries of a saved layout or fingerprint that a (partial) restore reads: those in
    ``keep`` (or under one of its prefixes); all of them for a full restore."""
    if not partial:
        return saved
    if by_prefix:
        return {k: v for k, v in saved.items() if any(k.startswith(p) for p in keep)}
    return {k: v for k, v in saved.items() if k in keep}


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits_u32(x: jax.Array) -> jax.Array:
    """The raw bits of every element as uint32 (64-bit elements give a trailing axis of 2)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size > 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Row-major index of every element, built per axis so no array is reshaped (resharded)."""
    pos, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return pos


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """[L, 2] uint32: two independent position-keyed hashes of each array's bits.

    Integer sums wrap exactly and commute, so the value does not depend on how the array is
    sharded; keying each word by its position catches swapped or shifted values.
    """

    def one(x: jax.Array) -> jax.Array:
        words = _bits_u32(jnp.asarray(x))
        pos = _positions(words.shape)
        seeds = (jnp.uint32(0x9E3779B9), jnp.uint32(0x7F4A7C15))
        return jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(pos ^ s)), dtype=jnp.uint32)
                          for s in seeds])  # fmt: skip

    return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(state: Any) -> list[str]:
    """One 64-bit hex checksum of each array's exact bits, in tree order."""
    sums = np.asarray(jax.device_get(_checksums(jax.tree.leaves(state))), np.uint64)
    return [f"{int(a) << 32 | int(b):016x}" for a, b in sums]


# The record's format: layout entries are [shape, dtype], fingerprints are exact hashes.
META_FORMAT = 2


def _slice_struct(x: Any, k: int) -> jax.ShapeDtypeStruct:
    """The abstract slice k of a stacked leaf: its shape and sharding without the layer axis."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _stacked_onto(abstract_state: Any, moe_every: int) -> Any:
    """Restored per-layer state -> the scanned layout, placed as ``abstract_state`` says."""

    def convert(restored: Any) -> Any:
        stacked = layer_stack.stack_layers(restored, moe_every)

        def place(x, like):
            sharding = getattr(like, "sharding", None)
            return x if sharding is None else jax.device_put(x, sharding)

        return jax.tree.map(place, stacked, abstract_state)

    return convert


def _per_layer_layout(saved: dict, abstract_state: Any, step: int, directory: Path, diff: str):
    """(target, convert) for a checkpoint written with the layers one by one, restored into
    scanned layers: the per-layer target to read it in and the stacking that follows; the
    one-line CheckpointMismatchError when that does not explain the difference either."""
    moe_every = layer_stack.moe_every_of(abstract_state)
    if moe_every is not None:
        per_layer = layer_stack.unstack_layers(abstract_state, _slice_struct)
        if _mismatch(saved, _layout(per_layer)) is None:
            return per_layer, _stacked_onto(abstract_state, moe_every)
    where = f"the checkpoint at step {step} in {directory}"
    if moe_every is None and any(f".{layer_stack.SCANNED}." in f".{k}" for k in saved):
        raise CheckpointMismatchError(
            f"{where} was written with scan_layers=True; set --config.model.scan_layers=True"
        )
    raise CheckpointMismatchError(
        f"{where} was written for another model or optimizer ({diff}); use the config it was "
        "trained with or another --workdir"
    )


# Orbax's record of a step; it restores without it.
STEP_RECORD = "_CHECKPOINT_METADATA"


def _step_record_is_readable(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_bytes()), dict)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False


def _check_stored_values(state_dir: Path) -> None:
    """Reads the last byte of every value in the step's OCDBT database (where Orbax keeps the
    arrays), which fails for a truncated or missing file, on a private event loop. Every read
    has ended, failed or not, before the loop closes, so none reports into a closed loop."""
    if not (state_dir / "manifest.ocdbt").is_file():
        return  # not an OCDBT checkpoint: Orbax reads it alone

    async def read_all() -> list:
        store = await ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"})
        keys = await store.list()
        last = [store.read(key, byte_range=slice(-1, None)) for key in keys]
        return await asyncio.gather(*last, return_exceptions=True)

    def run() -> list:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(read_all())
        finally:
            loop.close()

    # On a thread of its own: the caller's thread may already run a loop (a notebook kernel).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        results = pool.submit(run).result()
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _reason(e: BaseException) -> str:
    lines = str(e).splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


class Checkpointer:
    """Saves and restores one workdir's checkpoints. With ``create=False`` (reading a finished
    run) a workdir without checkpoints is a FileNotFoundError and nothing is created."""

    def __init__(self, workdir: str | Path, keep: int = 3, create: bool = True):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint under {self.directory}: train first")
        self._keep = keep
        self._create = create
        self._failed = False  # a save failed: Orbax's pending work is abandoned, not awaited
        self._repair_step_records()
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=self._create, cleanup_tmp_directories=self._create
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def _repair_step_records(self) -> None:
        """Replaces each missing or unreadable Orbax step record by an empty one (an unreadable
        one is moved aside, nothing is deleted), before Orbax opens the steps and logs each as
        a warning or an error."""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for step_dir in sorted(self.directory.iterdir()):
            if not step_dir.name.isdigit() or not step_dir.is_dir():
                continue
            record = step_dir / STEP_RECORD
            if not record.exists():
                what = "was missing; wrote an empty one"
            elif not _step_record_is_readable(record):
                kept = self._move_aside(record, step_dir.name)
                what = f"is unreadable; moved to {kept} and replaced by an empty one"
            else:
                continue
            record.write_text("{}")
            print(f"warning: checkpoint at step {step_dir.name}: Orbax's step record "
                  f"{STEP_RECORD} {what} (the checkpoint itself is read as usual)")  # fmt: skip

    def _move_aside(self, record: Path, step: str) -> Path:
        kept = self.workdir / "checkpoints_unreadable" / f"{step}-{int(time.time())}{STEP_RECORD}"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(record), kept)
        return kept

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes ``step`` and waits for it. CheckpointSpaceError when it does not fit, checked
        before writing where possible; the complete checkpoints are kept either way."""
        needed = space_needed(self.directory, self.steps(), state)
        free = free_bytes(self.directory)
        if free < needed:
            self._failed = True
            raise CheckpointSpaceError(self._no_space(step, needed, free))
        meta = {"format": META_FORMAT, "layout": _layout(state), "fingerprint": fingerprint(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            with failures_raised_not_logged():
                orbax_write(self._manager, step, args)
        except Exception as e:
            if not out_of_space(e):
                raise
            self._failed = True
            if jax.process_index() == 0:
                discard_unfinished(self.directory, step)
            raise CheckpointSpaceError(self._no_space(step, needed, None)) from None

    def _no_space(self, step: int, needed: int, free: int | None) -> str:
        steps = [s for s in self.steps() if s != step]
        return no_space_message(self.workdir, step, needed, free, steps[-1] if steps else None)

    def _meta(self, step: int) -> dict:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def _restore(self, step: int, abstract_state: Any, partial: bool) -> Any:
        if partial:  # only the arrays of abstract_state's top-level fields are read
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            state_args = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args,
                                                partial_restore=True)  # fmt: skip
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        args = ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        _check_stored_values(self.directory / str(step) / "state")
        restored = self._manager.restore(step, args=args)
        # Compared path by path: a partial restore reads some of the saved arrays.
        saved = dict(zip(restored.meta["layout"], restored.meta["fingerprint"], strict=True))
        got = dict(zip(_layout(restored.state), fingerprint(restored.state), strict=True))
        if _within(saved, set(got), partial) != got:
            raise CorruptCheckpointError(f"values of step {step} do not match its fingerprint")
        return restored.state

    def restore_latest(self, abstract_state: Any, partial: bool = False) -> tuple[int, Any] | None:
        """Restores the newest readable step onto ``abstract_state``'s shapes and shardings;
        None when there is none. ``partial``: ``abstract_state`` is a dict of some of the
        saved state's fields (the params alone, say), and only those are read."""
        self._manager.wait_until_finished()
        for step in reversed(self.steps()):
            try:
                meta = self._meta(step)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged step
                self._set_aside(step, _reason(e))
                continue
            # Another release's or another config's checkpoint is not damage: refuse it and
            # leave it in place.
            if meta.get("format") != META_FORMAT:
                raise CheckpointMismatchError(
                    f"the checkpoint at step {step} in {self.directory} has record format "
                    f"{meta.get('format', 1)}, and this release reads format {META_FORMAT} only; "
                    "retrain in another --workdir"
                )
            prefixes = {f"{k}." for k in abstract_state} if partial else None
            layout = _within(meta["layout"], prefixes, partial, by_prefix=True)
            diff = _mismatch(layout, _layout(abstract_state))
            target, convert = abstract_state, None
            if diff:
                target, convert = _per_layer_layout(layout, abstract_state, step,
                                                    self.directory, diff)  # fmt: skip
            try:
                restored = self._restore(step, target, partial)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._set_aside(step, _reason(e))
                continue
            return step, restored if convert is None else convert(restored)
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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        if self._failed:  # waiting would raise the failed write's error once more
            return
        self._manager.wait_until_finished()
        self._manager.close()
