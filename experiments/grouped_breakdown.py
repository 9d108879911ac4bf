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
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import grouped
from dynmoe_jax.moe.kernels.grouped_swiglu import grouped_swiglu
from experiments import bench_moe as bm
from experiments import moe_timing as timing


def _positive(kind: type):
    """An argparse type: a number of ``kind`` above 0 (argparse names the flag in its error)."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" message uses this name
    return parse


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the rest for ``bench_moe``'s parser (shapes, dtype, threshold)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=_positive(int), nargs="+", default=[16, 64])
    p.add_argument("--routers", nargs="+", choices=["top2", "topp"], default=["top2", "topp"])
    p.add_argument("--target-k", type=_positive(float), default=1.75)
    p.add_argument("--budget-factor", type=_positive(float), default=1.1)
    p.add_argument("--reps", type=_positive(int), default=5)
    p.add_argument("--fresh-mib", type=_positive(int), default=256, help="size of the fresh write")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_known_args(argv)


def layer_rows(layer, x_BTD: jax.Array) -> tuple[jax.Array, int]:
    """(rows per expert, buffer rows R) of the layer's grouped layout for x (one group per
    sequence), from the layer's own routing and selections."""
    cfg = layer.config
    g, s = x_BTD.shape[0], x_BTD.shape[1]
    sel = layer.grouped_selections(layer.route(x_BTD)[2], s)
    rows = grouped.num_rows(g * cfg.budget(s), cfg.num_experts, cfg.block_size)
    return grouped.layout(sel, s, cfg.num_experts, cfg.block_size, rows).group_sizes_E, rows


def experts_alone(layer, group_sizes_E: jax.Array, rows: int) -> tuple:
    """(fwd+bwd fn, args): the layer's experts on a random buffer with its rows per expert."""
    weights = (layer.w_gate_EDF[...], layer.w_up_EDF[...], layer.w_down_EFD[...])
    x_RD = jax.random.normal(jax.random.key(7), (rows, layer.config.d_model), jnp.float32)
    block = layer.config.block_size

    def loss(w, x):
        return jnp.sum(grouped_swiglu(x, group_sizes_E, *w, block_size=block))

    return jax.grad(loss, argnums=(0, 1)), (weights, x_RD)


def faults_per_call(compiled, args: tuple, calls: int = 3) -> float:
    """Minor page faults of one call (a warm-up call first)."""
    jax.block_until_ready(compiled(*args))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def case(bench: bm.Bench, router: str, experts: int, scale: float) -> dict:
    a = bench.args
    layer = bm.make_layer(a, experts, router, "grouped", scale)
    k = bench.useful_k(layer)
    if router == "topp":  # the budget sized on top-p's measured mean, as bench_moe's `matched`
        kw = {"expected_k": round(k, 3), "capacity_factor": a.budget_factor}
        layer = bm.make_layer(a, experts, router, "grouped", scale, **kw)
    sizes_E, rows = jax.jit(functools.partial(layer_rows, layer))(bench.x)
    fn, params = bm.layer_fwd_bwd(layer)
    programs = {
        "layer": (fn, (params, bench.x)),
        "experts alone": experts_alone(layer, sizes_E, rows),
    }
    parts = {name: (timing.compile_fn(fn, args)[0], args) for name, (fn, args) in programs.items()}
    parts["dense ideal"] = bench.dense(max(1, round(k * a.d_ff)))
    times, (_, stats) = timing.time_interleaved(list(parts.values()), a.reps)
    ms = {name: statistics.median(t) for name, t in zip(parts, times, strict=True)}
    dense = ms["dense ideal"]
    row = {"experts": experts, "router": router, "k_mean": round(k, 3),
           "rows_per_token": round(float(jnp.sum(sizes_E)) / a.tokens, 3),
           "load": timing.load_average()}  # fmt: skip
    # The layer's own count of the rows it computed, to check layer_rows against.
    row["layer_rows_per_token"] = round(float(stats["slots_per_token"]), 3)
    row["ms"] = {name: round(v, 1) for name, v in ms.items()}
    row["x_dense"] = {name: round(v / dense, 3) for name, v in ms.items()}
    row["x_dense"]["layer - experts"] = round((ms["layer"] - ms["experts alone"]) / dense, 3)
    row["faults_k"] = {n: round(faults_per_call(*p) / 1e3, 1) for n, p in parts.items()}
    bm.log(f"  {row}")
    return row


def fresh_write(mib: int) -> dict:
    """ms and page faults of filling a new buffer of ``mib`` MiB (median of 7 calls)."""
    n = mib * 2**20 // 4
    compiled = timing.compile_fn(lambda v: jnp.full((n,), v, jnp.float32), (jnp.float32(1),))[0]
    times, _ = timing.time_compiled(compiled, (jnp.float32(1),), 7)
    faults = faults_per_call(compiled, (jnp.float32(1),))
    ms = round(statistics.median(times), 1)
    return {"mib": mib, "ms": ms, "faults_k": round(faults / 1e3, 1)}


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
    a, bench_flags = parse_args(argv)
    experts = [str(e) for e in a.experts]
    bench = bm.Bench(bm.parse_args([*bench_flags, "--target-k", str(a.target_k), "--experts",
                                    *experts, "--sweep-experts", experts[0]]))  # fmt: skip
    bench.args.reps, bench.args.budget_factor = a.reps, a.budget_factor
    scales = bm.calibrate_all(bench)
    rows = [case(bench, r, e, scales[e]) for e in a.experts for r in a.routers]
    out = {"rows": rows, "fresh_write": fresh_write(a.fresh_mib), "jax": jax.__version__}
    print(table(rows, out["fresh_write"]), flush=True)
    timing.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
