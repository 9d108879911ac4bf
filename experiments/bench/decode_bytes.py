"""What one decode step reads from memory, and how fast this machine moves memory: the two
halves of ``bench_decode``'s bandwidth bound (tokens/s = rows / (step bytes / bandwidth)).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
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


def copy_bandwidth(mib: int, reps: int = 10) -> float:
    """Bytes read plus written per second by a jitted elementwise copy of ``mib`` MiB (STREAM's
    convention), in place: the input is donated, so no call writes into freshly mapped pages
    (a new output buffer per call measured page faults, not memory)."""
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    x = jax.block_until_ready(step(jnp.ones((mib * 2**20 // 4,), jnp.float32)))
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        x = jax.block_until_ready(step(x))
        times.append(time.perf_counter() - began)
    return 2 * x.nbytes / statistics.median(times)
