"""Running a decoder's blocks: one by one or scanned over a leading layer axis, with a remat
policy; and moving parameter trees between the two layouts.

Layouts (as pure dicts, the train state's form), with ``moe_every`` = m and s = L // m:
* per layer: ``blocks.{i}.*`` for i < L (what the Hugging Face importer writes into);
* scanned: ``scan_blocks.blocks.{j}.*`` for j < m, each array with a leading axis of s (the
  super-blocks: m - 1 dense layers then one MoE layer), and ``tail_blocks.{r}.*`` for the
  L % m layers after the last full super-block, run unscanned.
Layer i = k * m + j of the per-layer layout is super-block k's block j.

The leading axis carries the logical name ``layers`` (replicated by the sharding rules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax.model.config import Remat

LAYERS_AXIS = "layers"
SCANNED, TAIL, BLOCKS = "scan_blocks", "tail_blocks", "blocks"


# 'dots' keeps the projections' and feed-forwards' outputs (linear in T) and recomputes the
# attention scores, batched over B and N and quadratic in T; checkpoint_dots would keep those
# [B, N, T, U] scores too, the very memory that long contexts cannot afford.
_POLICIES: dict[Remat, Callable | None] = {
    Remat.FULL: None,
    Remat.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _rematted(fn: Callable, remat: Remat, prevent_cse: bool = True) -> Callable:
    if remat is Remat.NONE:
        return fn
    return jax.checkpoint(fn, policy=_POLICIES[remat], prevent_cse=prevent_cse)


def apply_block(
    block: nnx.Module, x: jax.Array, remat: Remat, valid: jax.Array | None = None
) -> tuple[jax.Array, Any]:
    """``block(x, valid)``, its activations kept as ``remat`` says."""
    if remat is Remat.NONE:
        return block(x, valid)
    graphdef, state = nnx.split(block)
    return _rematted(lambda st, y, v: nnx.merge(graphdef, st)(y, v), remat)(state, x, valid)


def scan_stack(
    stacked: nnx.Module, x: jax.Array, remat: Remat, valid: jax.Array | None = None
) -> tuple[jax.Array, Any]:
    """Runs the module whose parameters are stacked on a leading axis once per slice, in order
    (``jax.lax.scan``), each call given ``valid`` too; returns the last output and the stacked
    per-slice aux values."""
    graphdef, state = nnx.split(stacked)

    def body(y, st):
        return nnx.merge(graphdef, st)(y, valid)

    # Inside a scan the recomputation cannot be merged with the forward pass: no CSE guard.
    return jax.lax.scan(_rematted(body, remat, prevent_cse=False), x, state)


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose parameters stack the modules' on a leading
    ``layers`` axis."""
    graphdef, first = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules[1:]]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *states)
    module = nnx.merge(graphdef, stacked)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("logical_axes")
            if axes is not None:
                var.set_metadata(logical_axes=(LAYERS_AXIS, *axes))
    return module


# ----------------------------------------------------------------------------- layouts


def _map_dicts(tree: Any, fn: Callable[[dict], dict]) -> Any:
    """``tree`` with ``fn`` applied to every dict, innermost first (NamedTuples kept)."""
    if isinstance(tree, dict):
        return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_dicts(v, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_dicts(v, fn) for v in tree)
    return tree


def _by_index(blocks: dict) -> list:
    return [blocks[k] for k in sorted(blocks, key=int)]


def stack_layers(tree: Any, moe_every: int) -> Any:
    """Every per-layer ``blocks`` dict in ``tree`` (params, or an optimizer state holding
    them) moved into the scanned layout; leaves are arrays, stacked with ``jnp.stack``."""

    def fn(d: dict) -> dict:
        if BLOCKS not in d or SCANNED in d or not isinstance(d[BLOCKS], dict):
            return d
        layers = _by_index(d[BLOCKS])
        s = len(layers) // moe_every
        rest = {k: v for k, v in d.items() if k != BLOCKS}
        scanned = {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[layers[k * moe_every + j] for k in range(s)])
                   for j in range(moe_every)}  # fmt: skip
        tail = dict(enumerate(layers[s * moe_every :]))
        return {**rest, SCANNED: {BLOCKS: scanned}, **({TAIL: tail} if tail else {})}

    return _map_dicts(tree, fn)


def unstack_layers(tree: Any, take: Callable[[Any, int], Any]) -> Any:
    """The per-layer layout of a scanned tree; ``take(leaf, k)`` gives slice k of a stacked
    leaf (an array, or a ShapeDtypeStruct of the slice's shape)."""

    def fn(d: dict) -> dict:
        if SCANNED not in d:
            return d
        columns = _by_index(d[SCANNED][BLOCKS])
        m, tail = len(columns), _by_index(d.get(TAIL, {}))
        s = jax.tree.leaves(columns[0])[0].shape[0]
        layers = [jax.tree.map(lambda x, k=k: take(x, k), columns[j])
                  for k in range(s) for j in range(m)]  # fmt: skip
        rest = {k: v for k, v in d.items() if k not in (SCANNED, TAIL)}
        return {**rest, BLOCKS: dict(enumerate(layers + tail))}

    return _map_dicts(tree, fn)


def moe_every_of(tree: Any) -> int | None:
    """The super-block size of the first scanned layout in ``tree``; None when it has none."""
    found = []
    _map_dicts(tree, lambda d: found.append(len(d[SCANNED][BLOCKS])) or d if SCANNED in d else d)
    return found[0] if found else None
