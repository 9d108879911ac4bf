"""What one decode step reads from memory, and how fast this machine moves memory: the two
halves of ``bench_decode``'s bandwidth bounds (tokens/s = rows / (step bytes / bandwidth)),
one over the copy bandwidth and one over the read bandwidth.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import model as model_lib
from dynmoe_jax.moe import experts as experts_lib


@dataclasses.dataclass(frozen=True)
class WeightBytes:
    """What a decode step reads of the weights, split by how it scales (bytes)."""

    whole: int  # read whole by every step: attention, norms, routers, head, dense layers
    embed_row: int  # one row of the embedding: read once per batch row
    expert: int  # one expert's three weights, summed over the MoE layers
    num_experts: int

    def step(self, batch: int, union_experts: float, cache: int) -> float:
        """Bytes of a step of ``batch`` rows reading ``union_experts`` experts per MoE layer
        (a mean over the layers) and a key/value cache of ``cache`` bytes."""
        return self.whole + batch * self.embed_row + union_experts * self.expert + cache


def weight_bytes(params: nnx.State) -> WeightBytes:
    """The decode layout's weights, split as ``WeightBytes`` (experts in either layout)."""
    whole = embed_row = expert = 0
    num_experts = 0
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        if path[-1] in experts_lib.NAMES:
            num_experts = experts_lib.num_experts(value)
            expert += math.prod(experts_lib.expert_shape(value)) * _itemsize(value)
        elif path[-1] == "embed_VD":
            embed_row = value.shape[-1] * value.dtype.itemsize
        else:
            whole += value.size * value.dtype.itemsize
    return WeightBytes(whole, embed_row, expert, num_experts)


def expected_step(model_cfg: model_lib.ModelConfig, params: nnx.State, batch: int, k: float,
                  positions: int) -> tuple[float, float]:  # fmt: skip
    """(experts read per MoE layer, bytes) of a step of ``batch`` rows that each select ``k``
    experts, with a key/value cache of ``positions``: the union as ``expected_union``."""
    weights = weight_bytes(params)
    union = expected_union(weights.num_experts, k, batch)
    return union, weights.step(batch, union, cache_bytes(model_cfg, batch, positions))


def _itemsize(w: Any) -> int:
    return (w[0] if experts_lib.is_split(w) else w).dtype.itemsize


def cache_bytes(model_cfg: model_lib.ModelConfig, batch: int, positions: int) -> int:
    """The key/value cache ``generate`` allocates (``Decoder.init_cache``): keys and values
    of every layer, row and position."""
    per_position = 2 * model_cfg.num_layers * model_cfg.kv_heads * model_cfg.head_width
    return per_position * batch * positions * jnp.dtype(model_cfg.dtype).itemsize


def expected_union(num_experts: int, k: float, batch: int) -> float:
    """Experts a step of ``batch`` rows reads per MoE layer if each row picked ``k`` of the
    ``num_experts`` independently and uniformly (exactly ``k`` at one row)."""
    if batch == 1:
        return k
    return num_experts * (1 - (1 - min(k, num_experts) / num_experts) ** batch)


PROBE_MIB = 256  # the probes' default size, far beyond the caches
READ_COLUMNS = 4096  # the read probe's matrix width


def copy_program(mib: int) -> tuple[Callable[[], jax.Array], int]:
    """An in-place ``x + 1`` over ``mib`` MiB, and the bytes it moves (read plus written,
    STREAM's convention). The input is donated, so no call writes into freshly mapped pages
    (a new output buffer per call measured page faults, not memory)."""
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    state = [jax.block_until_ready(step(jnp.ones((mib * 2**20 // 4,), jnp.float32)))]

    def call() -> jax.Array:
        state[0] = jax.block_until_ready(step(state[0]))  # the donated buffer, threaded on
        return state[0]

    return call, 2 * mib * 2**20


def read_program(mib: int) -> tuple[Callable[[], jax.Array], int]:
    """A matrix-vector product of a ``mib`` MiB float32 matrix [rows, 4096], and the bytes it
    reads: a program that only reads, as a decode step reads its weights, with XLA's
    matrix-vector product splitting the rows over its threads. Where each core keeps only so
    many reads in flight, reading alone moves fewer bytes per second than a copy's reads and
    writes together: the copy's rate then overstates what a step that only reads can reach."""
    step = jax.jit(lambda a, v: a @ v)
    a = jnp.ones((mib * 2**20 // (4 * READ_COLUMNS), READ_COLUMNS), jnp.float32)
    v = jnp.ones((READ_COLUMNS,), jnp.float32)
    jax.block_until_ready(step(a, v))
    return lambda: jax.block_until_ready(step(a, v)), a.nbytes


def rate(program: tuple[Callable[[], Any], int], reps: int = 10) -> float:
    """Bytes per second of ``program`` (``copy_program`` or ``read_program``): the median
    of ``reps`` calls after one untimed call."""
    call, moved = program
    call()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return moved / statistics.median(times)


def copy_bandwidth(mib: int, reps: int = 10) -> float:
    """Bytes read plus written per second by ``copy_program(mib)``."""
    return rate(copy_program(mib), reps)


def read_bandwidth(mib: int, reps: int = 10) -> float:
    """Bytes read per second by ``read_program(mib)``."""
    return rate(read_program(mib), reps)
