"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints``.

Crash safety:
* Orbax writes each step to a temporary directory and renames it when complete, so a save cut
  by a crash is never listed as a step; leftover temporary directories are removed at start-up.
* Each checkpoint carries a small JSON record: the layout of the state (path -> shape and
  dtype) and a fingerprint (a 64-bit hash of each array's exact bits, independent of the mesh,
  so a flipped byte anywhere is caught). A checkpoint that fails to read, or whose values do
  not match its fingerprint (truncated or corrupted files), is reported, moved aside to
  ``WORKDIR/checkpoints_unreadable/`` (nothing is deleted) and the previous step is used.
* Parameters renamed since an earlier release (``RENAMED``) are read under their old names and
  renamed on restore, so those checkpoints continue. Likewise a checkpoint written with the
  layers one by one (``blocks.{i}``) restores into a model with scanned layers: it is read in
  its own layout and its blocks are stacked (``layer_stack``). The reverse is refused in one
  line naming the setting to use.
* A checkpoint whose layout differs from the model being restored was written by another
  config, and one whose record has another format was written by another release: both are
  refused with a one-line error and left in place.
* Orbax runs each restore on a fresh event loop and closes it as soon as one array fails, while
  tensorstore reads of the other arrays are still in flight; their completions then reach a
  closed loop and are printed as "Event loop is closed". Restores therefore run on loops that
  let unfinished tasks end before closing (``_quiet_failures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from dynmoe_jax.model import layer_stack


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


# Bounds the wait for a failed restore's other reads; any read still running after it is left
# to report into the closed loop, as before.
_DRAIN_TIMEOUT_S = 60.0


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop whose close() first lets its unfinished tasks end, so that tensorstore
    reads started by a failed restore complete while the loop can still receive them."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingLoop()


@contextlib.contextmanager
def _quiet_failures():
    """Orbax creates its restore loop with asyncio.new_event_loop(), which asks the policy."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


# The record's format: layout entries are [shape, dtype], fingerprints are exact hashes.
META_FORMAT = 2

# Parameter names of earlier releases -> today's. The key/value projections became [D, J, H]
# with grouped-query attention; with J = N (every older model) the arrays are the same.
RENAMED = {"wk_DNH": "wk_DJH", "wv_DNH": "wv_DJH"}


def rename_keys(tree: Any, names: dict[str, str]) -> Any:
    """``tree`` with every dict key found in ``names`` replaced, at any depth."""
    if isinstance(tree, dict):
        return {names.get(k, k): rename_keys(v, names) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple (optax states)
        return type(tree)(*(rename_keys(v, names) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(rename_keys(v, names) for v in tree)
    return tree


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


def _earlier_layout(saved: dict, abstract_state: Any, step: int, directory: Path, diff: str):
    """(target, convert): the layout an earlier checkpoint was written in, to restore it in,
    and the conversion of what is restored to ``abstract_state``'s layout; the one-line
    CheckpointMismatchError when no known change explains the difference."""
    older = {v: k for k, v in RENAMED.items()}
    candidates = [(rename_keys(abstract_state, older), lambda r: rename_keys(r, RENAMED))]
    moe_every = layer_stack.moe_every_of(abstract_state)
    if moe_every is not None:
        per_layer = layer_stack.unstack_layers(abstract_state, _slice_struct)
        stack = _stacked_onto(abstract_state, moe_every)
        candidates += [
            (per_layer, stack),
            (rename_keys(per_layer, older), lambda r: stack(rename_keys(r, RENAMED))),
        ]
    for target, convert in candidates:
        if _mismatch(saved, _layout(target)) is None:
            return target, convert
    where = f"the checkpoint at step {step} in {directory}"
    if moe_every is None and any(f".{layer_stack.SCANNED}." in f".{k}" for k in saved):
        raise CheckpointMismatchError(
            f"{where} was written with scan_layers=True; set --config.model.scan_layers=True"
        )
    raise CheckpointMismatchError(
        f"{where} was written for another model or optimizer ({diff}); use the config it was "
        "trained with or another --workdir"
    )


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
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=self._create, cleanup_tmp_directories=self._create
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        meta = {"format": META_FORMAT, "layout": _layout(state), "fingerprint": fingerprint(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def _meta(self, step: int) -> dict:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        with _quiet_failures():
            restored = self._manager.restore(step, args=args)
        return restored.meta

    def _restore(self, step: int, abstract_state: Any) -> Any:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        )
        with _quiet_failures():
            restored = self._manager.restore(step, args=args)
        # Compared path by path: a target of other containers (a NamedTuple for a saved dict)
        # may order the same arrays differently.
        saved = dict(zip(restored.meta["layout"], restored.meta["fingerprint"], strict=True))
        got = dict(zip(_layout(restored.state), fingerprint(restored.state), strict=True))
        if saved != got:
            raise CorruptCheckpointError(f"values of step {step} do not match its fingerprint")
        return restored.state

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restores the newest readable step onto ``abstract_state``'s shapes and shardings;
        None when there is none."""
        self._manager.wait_until_finished()
        for step in reversed(self.steps()):
            try:
                meta = self._meta(step)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged step
                self._set_aside(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            # Another release's or another config's checkpoint is not damage: refuse it and
            # leave it in place.
            if meta.get("format") != META_FORMAT:
                raise CheckpointMismatchError(
                    f"the checkpoint at step {step} in {self.directory} has record format "
                    f"{meta.get('format', 1)}, and this release reads format {META_FORMAT} only; "
                    "retrain in another --workdir"
                )
            diff = _mismatch(meta["layout"], _layout(abstract_state))
            target, convert = abstract_state, None
            if diff:
                target, convert = _earlier_layout(meta["layout"], abstract_state, step,
                                                  self.directory, diff)  # fmt: skip
            try:
                restored = self._restore(step, target)
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._set_aside(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
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
        self._manager.wait_until_finished()
        self._manager.close()
