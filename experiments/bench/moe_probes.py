"""The sections of ``bench_moe`` that look inside the layer rather than time it whole:

* ``priority``: which selections a binding grouped budget drops, by drop order, and the output
  that costs (forward only);
* ``memory``: XLA's temporary memory of forward+backward per dispatch and group size, compile
  only, with the experts made the identity to isolate the dispatch machinery;
* ``breakdown``: where top-2's time goes: the layer, its experts alone, the layer without
  experts and the dense ideal, timed in alternation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dynmoe_jax import MoELayer
from experiments.bench.harness import compile_program, log
from experiments.bench.layers import fwd_bwd, make_layer, without_experts
from experiments.bench.moe_sweeps import SectionRun

DROP_ORDERS = ("rank", "weight")


def priority(run: SectionRun) -> list[dict]:
    """Grouped top-p under a binding budget, both drop orders: dropped selections, and the
    output lost against the same layer without a budget (relative L2 norm)."""
    a, e, x, rows = run.args, run.args.sweep_experts, run.lb.x, []
    k = run.measured_k(e)
    full = run.layer(e, "topp", "grouped", capacity_factor=None)
    y_full = jax.jit(lambda x: full(x)[0])(x)
    for factor in a.priority_factors:
        for order in DROP_ORDERS:
            layer = run.layer(e, "topp", "grouped", expected_k=k, capacity_factor=factor,
                              drop_order=order)  # fmt: skip
            y, aux = jax.jit(layer)(x)
            lost = jnp.linalg.norm(y - y_full) / jnp.linalg.norm(y_full)
            row = {"experts": e, "capacity_factor": factor, "drop_order": order,
                   "dropped_fraction": round(float(aux["dropped_fraction"]), 4),
                   "output_lost": round(float(lost), 4)}  # fmt: skip
            log(f"  {row}")
            rows.append(row)
    return rows


def priority_table(title: str, rows: list[dict]) -> str:
    lines = [f"\n### {title}\n",
             "| E | budget factor | drop order | dropped | output lost (rel. L2) |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['experts']} | {r['capacity_factor']} | {r['drop_order']} | "
              f"{r['dropped_fraction']:.4f} | {r['output_lost']:.4f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


def _temp_mib(run: SectionRun, layer: MoELayer) -> float:
    fn, params = fwd_bwd(layer)
    return round(compile_program(fn, (params, run.lb.x)).temp_bytes / 2**20, 1)


def memory(run: SectionRun) -> list[dict]:
    """Compile only: temp memory per dispatch and --memory-groups size (top-2, router as
    initialised), for the whole layer and, for the capacity modes, with identity experts;
    then grouped top-p at --budget-factor on k = --target-k. Nothing without group sizes."""
    a, e, shape, rows = run.args, run.args.memory_experts, run.lb.shape, []
    if not a.memory_groups:
        return []
    for group in a.memory_groups:
        for dispatch in ("index", "einsum", "grouped"):
            row = {"experts": e, "router": "top2", "group_size": group, "dispatch": dispatch}
            layer = make_layer(shape, e, "top2", dispatch, group_size=group)
            row["temp_mib"] = _temp_mib(run, layer)
            if dispatch != "grouped":  # its experts are not a method to swap out
                row["dispatch_temp_mib"] = _temp_mib(run, without_experts(layer))
            log(f"  {row}")
            rows.append(row)
    changes = {"expected_k": a.target_k, "capacity_factor": a.budget_factor}
    row = {"experts": e, "router": "topp", "group_size": a.seq_len, "dispatch": "grouped"}
    row["temp_mib"] = _temp_mib(run, make_layer(shape, e, "topp", "grouped", **changes))
    log(f"  {row}")
    return [*rows, row]


def memory_table(title: str, rows: list[dict]) -> str:
    lines = [f"\n### {title}\n",
             "| E | router | group S | dispatch | temp MiB | dispatch-only MiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        only = f"{r['dispatch_temp_mib']:.0f}" if "dispatch_temp_mib" in r else "-"
        lines.append(f"| {r['experts']} | {r['router']} | {r['group_size']} | {r['dispatch']} | "
                     f"{r['temp_mib']:.0f} | {only} |")  # fmt: skip
    return "\n".join(lines)


def breakdown(run: SectionRun) -> dict:
    """Where top-2's time goes (E = --sweep-experts, index dispatch): the layer, its experts
    alone on a buffer of the dispatched shape [E, G*C, D], the layer with identity experts,
    and the dense ideal, all timed in alternation."""
    a, e, lb = run.args, run.args.sweep_experts, run.lb
    layer = run.layer(e, "top2", "index")
    rows_per_expert = a.tokens // a.seq_len * layer.config.capacity(a.seq_len)
    x_END = jax.random.normal(jax.random.key(4), (e, rows_per_expert, a.d_model), jnp.float32)
    x_END = x_END.astype(a.dtype)
    graphdef, params = nnx.split(layer)

    def experts_only(p, x):
        return jnp.sum(nnx.merge(graphdef, p).experts(x).astype(jnp.float32))

    programs = {
        "layer": lb.layer(layer),
        "identity experts": lb.layer(without_experts(run.layer(e, "top2", "index"))),
        "experts alone": compile_program(jax.grad(experts_only, argnums=(0, 1)), (params, x_END)),
        "dense ideal": lb.dense(2 * a.d_ff),
    }
    timings = lb.bench.time(programs)
    ms = {k: round(v, 1) for k, v in timings.medians.items()}
    out = {"experts": e, "ms": ms, "load": timings.load}
    out["x_dense"] = {k: round(v / ms["dense ideal"], 3) for k, v in ms.items()}
    log(f"  {out}")
    return out


def breakdown_table(title: str, b: dict) -> str:
    lines = [f"\n### {title} (load {b['load']})\n", "| part | ms | x dense |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {b['x_dense'][k]:.2f} |" for k, v in b["ms"].items()]
    return "\n".join(lines)
