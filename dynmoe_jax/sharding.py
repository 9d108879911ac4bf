"""Device mesh and the one table of logical axis rules that holds the sharding policy.

Parameters carry logical axis names (``nnx.Param(..., logical_axes=("expert", "embed", "mlp"))``);
activations are constrained by name inside the model. ``LOGICAL_AXIS_RULES`` maps every name to
mesh axes. Mesh axes: ``data`` (data parallel), ``expert`` (expert parallel: experts split over
it, and the batch too, so no device idles), ``model`` (tensor parallel, optional).

In the capacity modes the MoE layer's tokens move between layouts by an all-to-all (GShard):
groups are spread over every device (``groups`` -> data x expert) before dispatch, and the
dispatched buffer x_EGCD puts experts over ``expert`` and groups over ``data``. The grouped
mode instead runs a ring of experts under ``shard_map`` (``moe/expert_parallel.py``): all-gather
over ``expert``, local experts only, ``psum_scatter`` back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynmoe_jax.validation import ConfigError, invalid

MESH_AXES = ("data", "expert", "model")

# logical name -> mesh axes (None: replicated). The whole sharding policy is this table.
LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # tokens and routing groups over every device
    ("groups", ("data", "expert")),
    ("expert_groups", ("data",)),  # groups of the dispatched buffer x_EGCD
    ("expert", ("expert",)),  # expert weights and the dispatched buffer's E axis
    ("mlp", ("model",)),
    ("heads", ("model",)),
    ("kv_heads", ("model",)),  # key/value heads of grouped-query attention, split like heads
    ("embed", None),
    ("head_dim", None),
    ("vocab", None),
    ("capacity", None),
    ("length", None),
    ("layers", None),  # the leading axis of scanned (stacked) layers: every device holds all
)
_RULES = dict(LOGICAL_AXIS_RULES)


class MeshError(ConfigError):
    """The mesh does not fit the devices or the model."""


def parse_mesh_shape(mesh_shape: str, num_devices: int) -> dict[str, int]:
    """``"data=2,expert=4"`` -> {"data": 2, "expert": 4, "model": 1}; one axis may be -1 (the
    rest of the devices); ``""`` means a single device."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not mesh_shape.strip():
        return sizes
    seen = set()
    for part in mesh_shape.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or name in seen:
            allowed = f"axes {', '.join(MESH_AXES)}, each at most once (not {name!r})"
            invalid("mesh_shape", mesh_shape, allowed, MeshError)
        try:
            sizes[name] = int(value)
        except ValueError:
            invalid("mesh_shape", mesh_shape, f"an integer size for {name}", MeshError)
        seen.add(name)
    return _fill_rest(sizes, mesh_shape, num_devices)


def _fill_rest(sizes: dict[str, int], mesh_shape: str, num_devices: int) -> dict[str, int]:
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        invalid("mesh_shape", mesh_shape, "sizes >= 1, with at most one -1", MeshError)
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            allowed = f"sizes whose product divides the {num_devices} devices present"
            invalid("mesh_shape", mesh_shape, allowed, MeshError)
        sizes[rest[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total > num_devices:
        allowed = f"at most the {num_devices} devices present (it needs {total})"
        invalid("mesh_shape", mesh_shape, allowed, MeshError)
    return sizes


def make_mesh(mesh_shape: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types (Explicit axes break embedding lookups on sharded ids)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh_shape(mesh_shape, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    used = np.asarray(devices[: math.prod(shape)]).reshape(shape)
    return Mesh(used, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], mesh_axis_names=MESH_AXES) -> PartitionSpec:
    """Maps logical names through the rules; mesh axes absent from the mesh are dropped."""
    spec = []
    for name in logical_axes:
        axes = _RULES.get(name) if name is not None else None
        axes = tuple(a for a in (axes or ()) if a in mesh_axis_names)
        spec.append(axes if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names under the current mesh (``jax.set_mesh``); a
    no-op when no mesh is set, so the layer also runs outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh.axis_names))


def param_specs(abstract_model: nnx.Module) -> Any:
    """PartitionSpecs of the model's parameters as a pure dict (the train state's layout)."""
    state = nnx.state(abstract_model, nnx.Param)

    def spec(var):
        return var.replace(logical_to_spec(var.get_metadata()["logical_axes"]))

    specs = jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_spec() -> PartitionSpec:
    return logical_to_spec(("batch", "length"))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the batch rule's mesh axes."""
    return math.prod(mesh.shape[a] for a in _RULES["batch"])


def check_fits(mesh: Mesh, *, batch_size: int, num_experts: int | None, num_heads: int,
               d_ff: int, expert_d_ff: int | None, grad_accum_steps: int = 1,
               num_kv_heads: int | None = None,
               process_count: int | None = None) -> None:  # fmt: skip
    """Divisibility checks, run before compiling, each naming the field at fault.

    ``num_kv_heads``: grouped-query attention's key/value heads (None: as many as heads).
    ``process_count``: the processes that each read an equal share of every batch (default:
    this runtime's).
    """
    count = jax.process_count() if process_count is None else process_count
    allowed = f"a multiple of the process count {count} (each process reads an equal share)"
    if batch_size % count:
        invalid("batch_size", batch_size, allowed, MeshError)
    dp, ep, mp = data_parallel_size(mesh), mesh.shape["expert"], mesh.shape["model"]
    micro = batch_size // grad_accum_steps
    kv = num_heads if num_kv_heads is None else num_kv_heads
    checks = [
        (micro % dp == 0, "batch_size", batch_size,
         f"a multiple of grad_accum_steps x (data x expert) = {grad_accum_steps} x {dp}"),
        (num_heads % mp == 0, "model.num_heads", num_heads, f"a multiple of model={mp}"),
        (kv % mp == 0, "model.num_kv_heads", num_kv_heads, f"a multiple of model={mp}"),
        (d_ff % mp == 0, "model.d_ff", d_ff, f"a multiple of model={mp}"),
    ]  # fmt: skip
    if num_experts is not None:
        checks += [
            (num_experts % ep == 0, "moe.num_experts", num_experts, f"a multiple of expert={ep}"),
            (expert_d_ff % mp == 0, "moe.d_ff", expert_d_ff, f"a multiple of model={mp}"),
        ]
    for ok, field, value, allowed in checks:
        if not ok:
            invalid(field, value, f"{allowed}, to fit the mesh {dict(mesh.shape)}", MeshError)
