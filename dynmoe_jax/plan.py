"""Plan a run without running it: compile the train step ahead of time and size it per device.

``plan(config)`` builds the task for the config's mesh on the devices present (real, or
simulated with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``), lowers and compiles
the jitted train step on abstract inputs (``jax.eval_shape`` for the state,
``jax.ShapeDtypeStruct`` with shardings for the batch) and reads the compiled program's memory
and cost analyses. No parameter, optimizer or batch array is allocated, and no data is read:
the vocabulary size is the config's ``vocab_size`` (with ``init_from``, the checkpoint's).

The per-device total (parameters + optimizer state + the compiled step's temporaries) must
fit ``device_memory_bytes``; a plan that does not fails with a one-line ``ConfigError``.
Temporaries come from the compiler of the devices present: XLA:CPU keeps no savings of remat
(measured in experiments/results/plan.md), so a CPU plan of a remat config overstates them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import model as model_lib
from dynmoe_jax import train as train_lib
from dynmoe_jax.config import RunConfig, check_config
from dynmoe_jax.validation import counted, invalid

DEVICE_MEMORY_BYTES = 80e9  # an 80 GB card (A100/H100 80GB)
GB = 1e9
BYTES_KEYS = ("params_bytes_per_device", "opt_state_bytes_per_device", "temp_bytes_per_device")


def count_params(abstract_model: nnx.Module) -> tuple[int, int]:
    """(all parameters, expert parameters): those with an ``expert`` logical axis are split
    among the experts; the router, attention, dense and shared-expert weights are not."""
    total = experts = 0
    for var in jax.tree.leaves(
        nnx.state(abstract_model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        size = math.prod(var.shape)
        total += size
        if "expert" in (var.get_metadata().get("logical_axes") or ()):
            experts += size
    return total, experts


def active_params(model_cfg: model_lib.ModelConfig, total: int, experts: int) -> float:
    """Parameters one token passes through: the non-expert ones plus the experts' share
    ``k / E``, with k = ``moe.top_k`` (top-k) or ``moe.expected_k`` (top-p, whose k varies by
    token; expected_k is the k its capacity is sized for)."""
    moe = model_cfg.moe
    if moe is None:
        return float(total)
    return total - experts + experts * moe.capacity_k / moe.num_experts


def ffn_params_per_token(model_cfg: model_lib.ModelConfig, k: float | None = None) -> float:
    """Feed-forward parameters one token passes through, summed over the layers: a dense
    layer's whole SwiGLU; an MoE layer's k experts (default ``moe.capacity_k``; pass the
    measured experts per token) and its shared expert. Routers are left out."""
    swiglu = 3 * model_cfg.d_model  # gate, up and down, per unit of hidden width
    total = 0.0
    for layer in range(model_cfg.num_layers):
        if not model_cfg.is_moe_layer(layer):
            total += swiglu * model_cfg.d_ff
            continue
        moe = model_cfg.moe_layer(layer)
        total += swiglu * moe.d_ff * (moe.capacity_k if k is None else k)
        total += swiglu * (model_cfg.shared_d_ff or 0)
    return total


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def analytic_flops(model_cfg: model_lib.ModelConfig, matmul_params: float, tokens: int,
                   seq_len: int) -> float:  # fmt: skip
    """Train-step FLOPs as in PaLM's MFU: 6 per active matmul parameter per token (forward 2,
    backward 4), plus attention's 12 * L * N * H * T per token (scores and values over the
    full window, the mask's skipped half counted as PaLM does)."""
    head_width = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
    attention = 12 * model_cfg.num_layers * model_cfg.num_heads * head_width * seq_len
    return (6 * matmul_params + attention) * tokens


def _batch_structs(task: train_lib.Task) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (task.config.data.batch_size, task.config.data.seq_len)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    return {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=task.batch_sharding) for k, dt in dtypes.items()
    }


def _compile(task: train_lib.Task, log: Callable[[str], None]) -> tuple[Any, float]:
    state = train_lib.abstract_state(task)
    log(f"plan: compiling the train step on mesh {dict(task.mesh.shape)} "
        f"({counted(task.mesh.size, 'device', 'devices')}, "
        f"{task.mesh.devices.flat[0].platform})")  # fmt: skip
    start = time.perf_counter()
    with jax.set_mesh(task.mesh):  # the layers' sharding constraints read this mesh
        lowered = train_lib.make_train_step(task).lower(state, _batch_structs(task))
        compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def _flops(compiled, analytic: float, num_devices: int, has_loops: bool) -> tuple[float, str]:
    """The compiled step's FLOPs (all devices), or the analytic count when the step loops (grad
    accumulation, scanned layers: cost analysis counts a loop body once) or when cost analysis
    counts less than it."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    counted = float((cost or {}).get("flops", 0.0)) * num_devices  # per-device program
    if not has_loops and counted >= 0.9 * analytic:
        return counted, "cost_analysis"
    return analytic, f"analytic (cost_analysis counted {counted:.4g}: loop bodies count once)"


def check_fits_memory(total: int, parts: dict[str, int], device_memory_bytes: float) -> None:
    """The one-line error of a plan whose per-device total exceeds the device's memory."""
    if total <= device_memory_bytes:
        return
    detail = " + ".join(f"{k} {v / GB:.2f}" for k, v in parts.items())
    invalid(
        "device_memory_bytes",
        device_memory_bytes,
        f"at least the plan's per-device total {total / GB:.2f} GB ({detail}); lower the "
        "batch per device (grad_accum_steps), set model.remat, or split over more devices",
    )


def plan(config: RunConfig, device_memory_bytes: float = DEVICE_MEMORY_BYTES, devices=None,
         log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:  # fmt: skip
    """AOT-compiles the train step for ``config`` on ``devices`` (default: all present).

    Returns params (total count), active_params (per token at the configured k, see
    ``active_params``), params_bytes_per_device and opt_state_bytes_per_device (from the
    state's shardings), temp_bytes_per_device (the compiled step's temporaries),
    flops_per_step (the whole step on all devices: the MFU numerator's work), flops_source
    and compile_s. Raises ConfigError (one line) for a bad config, a mesh that does not
    divide, or a plan that does not fit ``device_memory_bytes``. ``log`` gets progress lines.
    """
    check_config(config, devices)
    task = train_lib.build_task(config, None, devices)
    model_cfg = task.config.model
    abstract = model_lib.abstract_decoder(model_cfg)
    total, experts = count_params(abstract)
    active = active_params(model_cfg, total, experts)
    state = train_lib.abstract_state(task)
    params_bytes = bytes_per_device(state.params)
    opt_bytes = bytes_per_device(state.opt_state)
    log(f"plan: {total:,} parameters, {active:,.0f} active per token")
    compiled, compile_s = _compile(task, log)
    log(f"plan: compiled in {compile_s:.1f} s")
    temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
    # The input lookup is a gather, not a matmul; a tied table is also the output head.
    embed = 0 if model_cfg.tie_embeddings else math.prod(abstract.embed_VD.shape)
    tokens = config.data.batch_size * config.data.seq_len
    analytic = analytic_flops(model_cfg, active - embed, tokens, config.data.seq_len)
    has_loops = config.train.grad_accum_steps > 1 or model_cfg.scan_layers
    flops, source = _flops(compiled, analytic, task.mesh.size, has_loops)
    parts = {"params": params_bytes, "optimizer": opt_bytes, "temporaries": temp_bytes}
    check_fits_memory(sum(parts.values()), parts, device_memory_bytes)
    return {
        "params": total,
        "active_params": active,
        "params_bytes_per_device": params_bytes,
        "opt_state_bytes_per_device": opt_bytes,
        "temp_bytes_per_device": temp_bytes,
        "flops_per_step": flops,
        "flops_source": source,
        "compile_s": round(compile_s, 2),
    }


def print_plan(config: RunConfig, device_memory_bytes: float = DEVICE_MEMORY_BYTES) -> dict:
    """``--mode=plan``: progress lines, then the plan as one JSON object on the last line."""
    result = plan(config, device_memory_bytes, log=lambda line: print(line, flush=True))
    total = sum(result[k] for k in BYTES_KEYS)
    print(f"plan: {total / GB:.2f} GB per device of {device_memory_bytes / GB:.2f} GB", flush=True)
    print(json.dumps(result), flush=True)
    return result
