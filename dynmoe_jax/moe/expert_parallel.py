"""Expert parallelism under ``shard_map``: the grouped mode's ring of experts, and the decode
path's local experts (``selected_experts``).

Every device holds the routing groups of its (data, expert) coordinate and E / ep experts
(ep = size of the ``expert`` axis). Inside ``shard_map``:

1. all-gather, over ``expert``, the tokens and the kept selections of the ep peers;
2. keep only the selections of this device's experts, lay them out as one block-padded buffer
   sorted by expert and run the grouped matmuls on it (``grouped.experts_on_selections``);
3. combine into every gathered token and return each peer its tokens' sums with
   ``psum_scatter`` over ``expert``. The backward pass is the transpose of the same collectives.

Why the ring and not a ragged all-to-all: every shape is static and the collectives exist on
every backend (CPU included, where the tests run), the budget already bounds the buffer, and
nothing is dropped for lack of a receive buffer. A ragged all-to-all would move k * T / ep rows
instead of T rows per device, which matters only once ep is large; its receive buffer must be
sized for the worst imbalance between devices or drop.

Memory per device: the peers' tokens, ep * T_local rows of D, and a buffer of
``ep * G_local * budget`` rows plus block padding; never E x T rows.

The decode path has few tokens: every device takes all of them (replicated), runs those of its
own experts that some token selected, and the outputs are summed over ``expert``.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec

from dynmoe_jax.moe import decode as decode_experts
from dynmoe_jax.moe import grouped
from dynmoe_jax.sharding import logical_to_spec

EXPERT_AXIS = "expert"


def expert_axis_size(mesh) -> int:
    """Size of the mesh's ``expert`` axis (1 without a mesh or without that axis)."""
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[EXPERT_AXIS]


def ring_experts(
    mesh,
    x_GSD: jax.Array,
    sel: grouped.Selections,
    weights: tuple[jax.Array, jax.Array, jax.Array],
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """``grouped.experts_on_selections`` over the mesh; same result, experts split over
    ``expert`` and groups over ``data`` x ``expert``. ``kwargs``: budget, block_size, backend.
    """
    spec_g = logical_to_spec(("groups",), mesh.axis_names)
    spec_w = PartitionSpec(EXPERT_AXIS)
    group_axes = tuple(a for a in ("data", EXPERT_AXIS) if a in mesh.axis_names)
    local = functools.partial(_local, group_axes=group_axes, **kwargs)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec_g, spec_g, (spec_w, spec_w, spec_w)),
        out_specs=(spec_g, PartitionSpec()),
        check_vma=False,
    )(x_GSD, sel, weights)


def _local(x_gSD, sel_g, weights, *, group_axes, **kwargs):
    num_local = weights[0].shape[0]
    offset = jax.lax.axis_index(EXPERT_AXIS) * num_local
    gather = functools.partial(jax.lax.all_gather, axis_name=EXPERT_AXIS, axis=0, tiled=True)
    x_all, sel_all = gather(x_gSD), jax.tree.map(gather, sel_g)
    y_all, rows = grouped.experts_on_selections(
        x_all, grouped.Selections(*sel_all), weights, expert_offset=offset, **kwargs
    )
    y_gSD = jax.lax.psum_scatter(y_all, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    return y_gSD, jax.lax.psum(rows, group_axes)


def selected_experts(
    mesh, x_MD: jax.Array, mask_ME: jax.Array, weights_ME: jax.Array, weights, max_used: int
) -> tuple[jax.Array, jax.Array]:
    """``decode_experts.selected_experts`` over the mesh: every device takes every token of
    the call and its own E / ep experts, and the outputs are summed over ``expert``. The same
    result as one device; u counts the experts computed on all devices."""
    replicated, spec_w = PartitionSpec(), PartitionSpec(EXPERT_AXIS)

    def local(x_MD, mask_ME, weights_ME, weights):
        num_local = weights[0].shape[0]
        offset = jax.lax.axis_index(EXPERT_AXIS) * num_local
        mine = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=offset,
                                 slice_size=num_local, axis=1)  # fmt: skip
        y_MD, used = decode_experts.selected_experts(
            x_MD, mine(mask_ME), mine(weights_ME), weights, min(max_used, num_local)
        )
        return jax.lax.psum(y_MD, EXPERT_AXIS), jax.lax.psum(used, EXPERT_AXIS)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, replicated, replicated, (spec_w, spec_w, spec_w)),
        out_specs=(replicated, replicated),
        check_vma=False,
    )(x_MD, mask_ME, weights_ME, weights)
