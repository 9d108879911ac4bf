"""Where the grouped layer's time goes, against the dense ideal (fwd+bwd, the layer benchmark's
setting: T = 8192, D = 512, F = 1024, float32).

    .venv/bin/python -m experiments.grouped_breakdown \
        --json experiments/results/grouped_breakdown.json

Per case (top-2 at each E; top-p with its router scaled to select --target-k experts on
average and a budget of --budget-factor on its measured mean, as in ``bench_moe``), three
programs timed in alternation, each with the minor page faults one call takes:

* the layer (routing, budget, layout, dispatch, experts, combine);
* its experts alone: ``grouped_swiglu`` on a buffer with the layer's own rows per expert;
* the dense SwiGLU of hidden k * F.

The layer minus its experts is what routing and the buffer cost. Then one fresh write: a
jitted program that fills a new buffer of --fresh-mib MiB, for the machine's cost of touching
fresh memory (XLA on CPU allocates every call's scratch and outputs anew, and each new 4 KiB
page faults once).

Axis letters: G groups, S tokens per group, R buffer rows, D model width, E experts.
"""

from __future__ import annotations

import argparse
import functools
import resource
from pathlib import Path

import jax
import jax.numpy as jnp

from dynmoe_jax import MoELayer
from dynmoe_jax.moe import grouped
from dynmoe_jax.moe.kernels.grouped_swiglu import grouped_swiglu
from experiments.bench import flags, harness
from experiments.bench.harness import Bench, Program, compile_program
from experiments.bench.layer_bench import LayerBench
from experiments.bench.layers import make_layer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive_int, positive_float = flags.positive(int), flags.positive(float)
    p.add_argument("--experts", type=positive_int, nargs="+", default=[16, 64])
    p.add_argument("--routers", nargs="+", choices=["top2", "topp"], default=["top2", "topp"])
    p.add_argument("--target-k", type=positive_float, default=1.75)
    p.add_argument("--budget-factor", type=positive_float, default=1.1)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--fresh-mib", type=positive_int, default=256, help="size of the fresh write")
    flags.add_layer_shape(p)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    flags.check_layer_shape(p, args)
    return args


def layer_rows(layer: MoELayer, x_BTD: jax.Array) -> tuple[jax.Array, int]:
    """(rows per expert, buffer rows R) of the layer's grouped layout for x (one group per
    sequence), from the layer's own routing and selections."""
    cfg = layer.config
    g, s = x_BTD.shape[0], x_BTD.shape[1]
    r = layer.route(x_BTD)[2]
    sel = grouped.select_groups(r.mask, r.rank, r.weights, budget=cfg.budget(s),
                                num_ranks=cfg.max_selections, order=cfg.drop_order)  # fmt: skip
    rows = grouped.num_rows(g * cfg.budget(s), cfg.num_experts, cfg.block_size)
    return grouped.layout(sel, s, cfg.num_experts, cfg.block_size, rows).group_sizes_E, rows


def experts_alone(layer: MoELayer, group_sizes_E: jax.Array, rows: int) -> Program:
    """The layer's experts forward+backward on a random buffer with its rows per expert."""
    weights = (layer.w_gate_EDF[...], layer.w_up_EDF[...], layer.w_down_EFD[...])
    x_RD = jax.random.normal(jax.random.key(7), (rows, layer.config.d_model), jnp.float32)
    block = layer.config.block_size

    def loss(w, x):
        return jnp.sum(grouped_swiglu(x, group_sizes_E, *w, block_size=block))

    return compile_program(jax.grad(loss, argnums=(0, 1)), (weights, x_RD))


def faults_per_call(program: Program, calls: int = 3) -> float:
    """Minor page faults of one call (a warm-up call first)."""
    program()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        program()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def case_layer(lb: LayerBench, a: argparse.Namespace, router: str, experts: int,
               scale: float) -> tuple[MoELayer, float]:  # fmt: skip
    """(the layer, its mean k): top-p's budget sized on its measured mean, as bench_moe's
    ``matched`` section does."""
    layer = make_layer(lb.shape, experts, router, "grouped", scale)
    k = lb.useful_k(layer)
    if router == "topp":
        changes = {"expected_k": round(k, 3), "capacity_factor": a.budget_factor}
        layer = make_layer(lb.shape, experts, router, "grouped", scale, **changes)
    return layer, k


def case(lb: LayerBench, a: argparse.Namespace, router: str, experts: int, scale: float) -> dict:
    layer, k = case_layer(lb, a, router, experts, scale)
    sizes_E, rows = jax.jit(functools.partial(layer_rows, layer))(lb.x)
    programs = {"layer": lb.layer(layer), "experts alone": experts_alone(layer, sizes_E, rows),
                "dense ideal": lb.dense(max(1, round(k * a.d_ff)))}  # fmt: skip
    timings = lb.bench.time(programs)
    ms = timings.medians
    dense = ms["dense ideal"]
    row = {"experts": experts, "router": router, "k_mean": round(k, 3),
           "rows_per_token": round(float(jnp.sum(sizes_E)) / a.tokens, 3),
           "load": timings.load}  # fmt: skip
    # The layer's own count of the rows it computed, to check layer_rows against.
    _, stats = timings.first_out
    row["layer_rows_per_token"] = round(float(stats["slots_per_token"]), 3)
    row["ms"] = {name: round(v, 1) for name, v in ms.items()}
    row["x_dense"] = {name: round(v / dense, 3) for name, v in ms.items()}
    row["x_dense"]["layer - experts"] = round((ms["layer"] - ms["experts alone"]) / dense, 3)
    row["faults_k"] = {n: round(faults_per_call(p) / 1e3, 1) for n, p in programs.items()}
    harness.log(f"  {row}")
    return row


def fresh_write(mib: int) -> dict:
    """ms and page faults of filling a new buffer of ``mib`` MiB (median of 7 calls)."""
    n = mib * 2**20 // 4
    bench = Bench(reps=7)
    fill = bench.compile(lambda v: jnp.full((n,), v, jnp.float32), (jnp.float32(1),))
    ms = round(bench.time({"fill": fill}).median("fill"), 1)
    return {"mib": mib, "ms": ms, "faults_k": round(faults_per_call(fill) / 1e3, 1)}


def table(rows: list[dict], fresh: dict) -> str:
    lines = ["| E | router | k | rows / token | part | ms | x dense | page faults / call (k) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        head = f"| {r['experts']} | {r['router']} | {r['k_mean']:.2f} | {r['rows_per_token']:.2f}"
        for name, ms in r["ms"].items():
            lines.append(f"{head} | {name} | {ms:.0f} | {r['x_dense'][name]:.2f} | "
                         f"{r['faults_k'][name]:.0f} |")  # fmt: skip
        lines.append(f"{head} | layer - experts | - | {r['x_dense']['layer - experts']:.2f} | - |")
    lines.append(f"\nA fresh {fresh['mib']} MiB write: {fresh['ms']:.1f} ms, "
                 f"{fresh['faults_k']:.1f}k page faults.")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    lb = LayerBench(flags.layer_shape(a), Bench(a.reps))
    scales = lb.calibrate(a.experts, a.target_k)
    rows = [case(lb, a, r, e, scales[e]) for e in a.experts for r in a.routers]
    out = {"rows": rows, "fresh_write": fresh_write(a.fresh_mib), "jax": jax.__version__}
    print(table(rows, out["fresh_write"]), flush=True)
    harness.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
