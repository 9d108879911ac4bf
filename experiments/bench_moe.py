"""Speed and memory of the MoE layer's jitted forward+backward, against the dense ideal.

Run from the repository root (each section prints a table; ``--json`` writes every figure):

    .venv/bin/python -m experiments.bench_moe --json experiments/results/bench_moe.json
    .venv/bin/python -m experiments.bench_moe --experts 16 --routers top2 --dispatch index

For every (E, router, dispatch) case: the median ms of the compiled fwd+bwd (AOT compile and one
warm-up call excluded), the achieved GFLOP/s on the useful expert FLOPs (those of the experts
actually selected: 6*D*F*k_mean per token forward, x3 with the backward), the ratio to a dense
SwiGLU MLP of hidden k_mean*F (the ideal; its calls alternate with the case's, so load drifts on
a shared machine hit both alike), that rate as a fraction of a plain size^3 matmul's, XLA's
temporary memory and the compile time.

Grouped rows: ``cf/budget`` is the budget factor (a group keeps ``ceil(cf * k * S)``
selections), B the block size; sections ``budget``, ``blocks``, ``groups`` and ``priority``
sweep the budget factor, B, the routing group size and the drop order. The module is longer
than the project's ~300 lines because every section shares the timing harness above.

Router: the layer's own, with its weights scaled so that top-p selects ``--target-k`` experts on
average, as a trained router does (a fresh router's flat probabilities make top-p pick 3-6 of 16
experts). The scale is found by bisection per E and applied to every router of that E; the
measured mean k is reported. Extra sections: top-p's expected_k swept (drops and time), and
top-p with expected_k set to its measured mean k.

Axis letters: B batch, S sequence (one routing group), D model, F expert hidden, E experts.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

try:
    from experiments import moe_timing as timing
except ImportError:  # run as a script: python experiments/bench_moe.py
    import moe_timing as timing

from dynmoe_jax import MoELayer
from dynmoe_jax.moe import routing

ROUTERS = {
    "top1": {"router": "top_k", "top_k": 1},
    "top2": {"router": "top_k", "top_k": 2},
    "topp": {"router": "top_p"},
}
DISPATCHES = ("einsum", "index", "grouped")
SECTIONS = ("grid", "sweep", "matched", "budget", "blocks", "groups", "priority", "memory",
            "breakdown")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    p.add_argument("--dispatch", nargs="+", choices=DISPATCHES, default=list(DISPATCHES))
    p.add_argument("--tokens", type=int, default=8192, help="T = batch * seq_len")
    p.add_argument("--seq-len", type=int, default=1024, help="one routing group per sequence")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--target-k", type=float, default=1.75, help="top-p mean k to calibrate to")
    p.add_argument("--grid-expected-k", type=float, default=2.0, help="top-p capacity k")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--slow-s", type=float, default=4.0, help="one timed call if warm-up > this")
    p.add_argument("--max-temp-gib", type=float, default=4.0, help="skip bigger programs")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--sweep-k", type=float, nargs="*", default=[1.5, 1.75, 2.0, 2.25, 2.5])
    p.add_argument("--sweep-experts", type=int, default=16)
    p.add_argument("--sweep-dispatch", default="index", choices=DISPATCHES[:2])
    p.add_argument("--budget-factor", type=float, default=1.1, help="grouped: on measured k")
    p.add_argument("--budget-factors", type=float, nargs="*", default=[1.0, 1.05, 1.1, 1.2, 1.3])
    p.add_argument("--block-sizes", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--group-sizes", type=int, nargs="*", default=[256, 1024, 8192])
    p.add_argument("--priority-factors", type=float, nargs="*", default=[0.9, 1.0])
    p.add_argument("--fused-dense", action="store_true", help="also x a fused-gate/up dense")
    p.add_argument("--memory-experts", type=int, default=64)
    p.add_argument("--memory-groups", type=int, nargs="*", default=[1024, 4096, 8192])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def make_input(args) -> jax.Array:
    shape = (args.tokens // args.seq_len, args.seq_len, args.d_model)
    return jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(args.dtype)


@functools.partial(jax.jit, static_argnames="threshold")
def _mean_top_p_k(router_DE: jax.Array, x: jax.Array, threshold: float) -> jax.Array:
    probs = jax.nn.softmax(x.reshape(-1, x.shape[-1]).astype(jnp.float32) @ router_DE, axis=-1)
    return jnp.mean(jnp.sum(routing.top_p_mask(probs, threshold), axis=-1))


def mean_top_p_k(router_DE: jax.Array, x: jax.Array, threshold: float) -> float:
    return float(_mean_top_p_k(router_DE, x, threshold=threshold))


def calibrate_scale(router_DE: jax.Array, x: jax.Array, threshold: float, target: float) -> float:
    """Router-weight scale giving top-p a mean of ``target`` experts (bisection in log scale;
    larger weights -> peakier softmax -> fewer experts)."""
    lo, hi = math.log(0.1), math.log(100.0)
    for _ in range(25):
        mid = (lo + hi) / 2
        if mean_top_p_k(router_DE * math.exp(mid), x, threshold) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def make_layer(args, num_experts: int, router: str, dispatch: str, scale: float, **kw):
    fields = {"threshold": args.threshold, "capacity_factor": args.capacity_factor}
    fields.update({**ROUTERS[router], **kw})
    fields.update(num_experts=num_experts, d_model=args.d_model, d_ff=args.d_ff)
    layer = MoELayer(rngs=nnx.Rngs(0), dispatch=dispatch, dtype=jnp.dtype(args.dtype), **fields)
    layer.router_DE[...] = layer.router_DE[...] * scale
    return layer


STATS = ("experts_per_token", "dropped_fraction", "slots_per_token")


def layer_fwd_bwd(layer: MoELayer):
    """(fn, params): gradients of sum(y) w.r.t. every parameter and x, plus routing stats."""
    graphdef, params = nnx.split(layer)

    def loss(p, x):
        y, aux = nnx.merge(graphdef, p)(x)
        return jnp.sum(y.astype(jnp.float32)), {k: aux[k] for k in STATS}

    return jax.grad(loss, argnums=(0, 1), has_aux=True), params


class Bench:
    """Runs cases, each timed in alternation with its dense ideal (compiled once per width)."""

    def __init__(self, args):
        self.args = args
        self.x = make_input(args)
        self.dense_cache: dict[tuple[int, bool], tuple] = {}
        self.matmul = timing.matmul_gflops(args.matmul_size, jnp.dtype(args.dtype))

    def dense(self, hidden: int, fused: bool = False) -> tuple:
        """(compiled, args) of the dense SwiGLU of this hidden width."""
        if (hidden, fused) not in self.dense_cache:
            a = self.args
            fn, fargs = timing.dense_swiglu_case(a.tokens, a.d_model, hidden, a.dtype, fused)
            self.dense_cache[hidden, fused] = (timing.compile_fn(fn, fargs)[0], fargs)
        return self.dense_cache[hidden, fused]

    def useful_k(self, layer: MoELayer) -> float:
        cfg = layer.config
        if cfg.router.value == "top_k":
            return float(cfg.top_k)
        return mean_top_p_k(layer.router_DE[...], self.x, cfg.threshold)

    def case(self, layer: MoELayer, label: dict) -> dict:
        a = self.args
        fn, params = layer_fwd_bwd(layer)
        compiled, compile_s = timing.compile_fn(fn, (params, self.x))
        row = {**label, "compile_s": round(compile_s, 2)}
        row["temp_mib"] = round(timing.temp_bytes(compiled) / 2**20, 1)
        if row["temp_mib"] > a.max_temp_gib * 1024:
            row["skipped"] = f"temp {row['temp_mib'] / 1024:.1f} GiB > --max-temp-gib"
            log(f"  {label}: skipped ({row['skipped']})")
            return row
        hidden = max(1, round(self.useful_k(layer) * a.d_ff))
        refs = [self.dense(hidden)] + ([self.dense(hidden, fused=True)] if a.fused_dense else [])
        times, (_, stats) = timing.time_interleaved([(compiled, (params, self.x)), *refs],
                                                    a.reps, a.slow_s)  # fmt: skip
        row.update({k: round(float(v), 4) for k, v in jax.device_get(stats).items()})
        return self._rates(row, times, hidden)

    def _rates(self, row: dict, times: list[list[float]], hidden: int) -> dict:
        a = self.args
        ms, dense_ms = statistics.median(times[0]), statistics.median(times[1])
        flops = timing.swiglu_fwd_bwd_flops(a.tokens, a.d_model, row["experts_per_token"] * a.d_ff)
        gflops = flops / (ms * 1e-3) / 1e9
        row.update(ms=round(ms, 1), reps=len(times[0]), all_ms=[round(t, 1) for t in times[0]])
        row.update(gflops=round(gflops, 1), dense_hidden=hidden, dense_ms=round(dense_ms, 1))
        row["x_dense"] = round(ms / dense_ms, 3)
        if a.fused_dense:
            row["x_dense_fused"] = round(ms / statistics.median(times[2]), 3)
        row["of_matmul_rate"] = round(gflops / self.matmul, 3)
        row["load"] = timing.load_average()
        log(f"  {row}")
        return row


def grid(bench: Bench, scales: dict[int, float]) -> list[dict]:
    a, rows = bench.args, []
    for e in a.experts:
        for router in a.routers:
            kw = {"expected_k": a.grid_expected_k} if router == "topp" else {}
            for dispatch in a.dispatch:
                layer = make_layer(a, e, router, dispatch, scales[e], **kw)
                label = {"experts": e, "router": router, "dispatch": dispatch}
                rows.append(bench.case(layer, {**label, "expected_k": layer.config.capacity_k}))
    return rows


def sweep(bench: Bench, scale: float, expected_ks: list[float]) -> list[dict]:
    a, rows = bench.args, []
    for ek in expected_ks:
        e, dispatch = a.sweep_experts, a.sweep_dispatch
        layer = make_layer(a, e, "topp", dispatch, scale, expected_k=ek)
        label = {"experts": e, "router": "topp", "dispatch": dispatch, "expected_k": ek}
        rows.append(bench.case(layer, label))
    return rows


def matched(bench: Bench, scale: float) -> list[dict]:
    """top-p with capacity sized to its own measured mean k, every capacity dispatch."""
    a = bench.args
    k = round(mean_top_p_k(make_layer(a, a.sweep_experts, "topp", "index", scale).router_DE[...],
                           bench.x, a.threshold), 3)  # fmt: skip
    rows = []
    for dispatch in a.dispatch:
        # grouped: one budget per group of --budget-factor x the mean; capacity modes: cf as set.
        kw = {"capacity_factor": a.budget_factor} if dispatch == "grouped" else {}
        layer = make_layer(a, a.sweep_experts, "topp", dispatch, scale, expected_k=k, **kw)
        label = {"experts": a.sweep_experts, "router": "topp", "dispatch": dispatch}
        rows.append(bench.case(layer, {**label, "expected_k": k, **kw}))
    return rows


def budget_sweep(bench: Bench, scale: float) -> list[dict]:
    """Grouped top-p: the budget factor (on the measured mean k) swept; drops and time."""
    a, e, rows = bench.args, bench.args.sweep_experts, []
    k = round(mean_top_p_k(make_layer(a, e, "topp", "grouped", scale).router_DE[...], bench.x,
                           a.threshold), 3)  # fmt: skip
    for factor in a.budget_factors:
        layer = make_layer(a, e, "topp", "grouped", scale, expected_k=k, capacity_factor=factor)
        label = {"experts": e, "router": "topp", "dispatch": "grouped", "expected_k": k}
        rows.append(bench.case(layer, {**label, "capacity_factor": factor}))
    return rows


def block_sweep(bench: Bench, scales: dict[int, float]) -> list[dict]:
    """Grouped top-2: the block size B of the grouped matmul."""
    a, rows = bench.args, []
    for e in sorted({a.sweep_experts, max(a.experts)}):
        for b in a.block_sizes:
            layer = make_layer(a, e, "top2", "grouped", scales[e], block_size=b)
            label = {"experts": e, "router": "top2", "dispatch": "grouped", "expected_k": 2.0}
            rows.append(bench.case(layer, {**label, "block_size": b}))
    return rows


def group_sweep(bench: Bench, scale: float) -> list[dict]:
    """Grouped top-p at --budget-factor on the mean k: the routing group size (the budget is per
    group, so bigger groups even out the number of selections)."""
    a, e, rows = bench.args, bench.args.sweep_experts, []
    k = round(mean_top_p_k(make_layer(a, e, "topp", "grouped", scale).router_DE[...], bench.x,
                           a.threshold), 3)  # fmt: skip
    for g in a.group_sizes:
        kw = {"expected_k": k, "capacity_factor": a.budget_factor, "group_size": g}
        layer = make_layer(a, e, "topp", "grouped", scale, **kw)
        label = {"experts": e, "router": "topp", "dispatch": "grouped"}
        rows.append(bench.case(layer, {**label, **kw}))
    return rows


def priority(bench: Bench, scale: float) -> list[dict]:
    """Grouped top-p under a binding budget, both drop orders: dropped selections, and the
    output lost against the same layer without a budget (relative L2 norm), forward only."""
    a, e, rows = bench.args, bench.args.sweep_experts, []
    k = mean_top_p_k(make_layer(a, e, "topp", "grouped", scale).router_DE[...], bench.x,
                     a.threshold)  # fmt: skip
    full = make_layer(a, e, "topp", "grouped", scale, capacity_factor=None)
    y_full = jax.jit(lambda x: full(x)[0])(bench.x)
    for factor in a.priority_factors:
        for order in ("rank", "weight"):
            layer = make_layer(a, e, "topp", "grouped", scale, expected_k=k,
                               capacity_factor=factor, drop_order=order)  # fmt: skip
            y, aux = jax.jit(layer)(bench.x)
            lost = jnp.linalg.norm(y - y_full) / jnp.linalg.norm(y_full)
            row = {"experts": e, "capacity_factor": factor, "drop_order": order,
                   "dropped_fraction": round(float(aux["dropped_fraction"]), 4),
                   "output_lost": round(float(lost), 4)}  # fmt: skip
            log(f"  {row}")
            rows.append(row)
    return rows


def priority_table(rows: list[dict]) -> str:
    lines = ["\n### grouped top-p, drop order under a binding budget (forward)\n",
             "| E | budget factor | drop order | dropped | output lost (rel. L2) |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['experts']} | {r['capacity_factor']} | {r['drop_order']} | "
              f"{r['dropped_fraction']:.4f} | {r['output_lost']:.4f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


COLUMNS = (
    ("experts", "E", "{}"), ("router", "router", "{}"), ("dispatch", "dispatch", "{}"),
    ("expected_k", "cap k", "{:.2f}"), ("capacity_factor", "cf/budget", "{}"),
    ("block_size", "B", "{}"), ("group_size", "group", "{}"),
    ("experts_per_token", "k mean", "{:.3f}"),
    ("dropped_fraction", "dropped", "{:.3f}"), ("slots_per_token", "slots/tok", "{:.2f}"),
    ("ms", "ms", "{:.1f}"), ("dense_ms", "dense ms", "{:.1f}"), ("gflops", "GFLOP/s", "{:.1f}"),
    ("x_dense", "x dense", "{:.2f}"),
    ("x_dense_fused", "x fused dense", "{:.2f}"), ("of_matmul_rate", "of matmul", "{:.2f}"),
    ("temp_mib", "temp MiB", "{:.0f}"),
    ("compile_s", "compile s", "{:.1f}"), ("load", "load", "{:.1f}"),
)  # fmt: skip


def table(title: str, rows: list[dict]) -> str:
    """A Markdown table of the rows (skipped cases say why)."""
    lines = [f"\n### {title}\n", "| " + " | ".join(c[1] for c in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = [fmt.format(row[k]) if k in row else "-" for k, _, fmt in COLUMNS]
        if "skipped" in row:
            cells[[c[0] for c in COLUMNS].index("ms")] = f"skipped: {row['skipped']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _NoExperts(MoELayer):
    """The layer with identity experts: what remains is routing and dispatch/combine."""

    def experts(self, x_EXD: jax.Array) -> jax.Array:
        return x_EXD


def _temp_mib(bench: Bench, layer: MoELayer) -> float:
    fn, params = layer_fwd_bwd(layer)
    return round(timing.temp_bytes(timing.compile_fn(fn, (params, bench.x))[0]) / 2**20, 1)


def memory(bench: Bench) -> list[dict]:
    """Compile-only: XLA temp memory of fwd+bwd per dispatch and group size (top-2), for the
    whole layer and, for the capacity modes, with identity experts (the dispatch machinery
    alone); then grouped top-p at --budget-factor on k = --target-k."""
    a, e, rows = bench.args, bench.args.memory_experts, []
    for group in a.memory_groups:
        for dispatch in ("index", "einsum", "grouped"):
            row = {"experts": e, "router": "top2", "group_size": group, "dispatch": dispatch}
            layer = make_layer(a, e, "top2", dispatch, 1.0, group_size=group)
            row["temp_mib"] = _temp_mib(bench, layer)
            if dispatch != "grouped":  # its experts are not a method to swap out
                layer.__class__ = _NoExperts
                row["dispatch_temp_mib"] = _temp_mib(bench, layer)
            log(f"  {row}")
            rows.append(row)
    kw = {"expected_k": a.target_k, "capacity_factor": a.budget_factor}
    row = {"experts": e, "router": "topp", "group_size": a.seq_len, "dispatch": "grouped"}
    row["temp_mib"] = _temp_mib(bench, make_layer(a, e, "topp", "grouped", 1.0, **kw))
    log(f"  {row}")
    return [*rows, row]


def memory_table(rows: list[dict]) -> str:
    lines = ["\n### temp memory, fwd+bwd (compile only)\n",
             "| E | router | group S | dispatch | temp MiB | dispatch-only MiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        only = f"{r['dispatch_temp_mib']:.0f}" if "dispatch_temp_mib" in r else "-"
        lines.append(f"| {r['experts']} | {r['router']} | {r['group_size']} | {r['dispatch']} | "
                     f"{r['temp_mib']:.0f} | {only} |")  # fmt: skip
    return "\n".join(lines)


def breakdown(bench: Bench, scale: float) -> dict:
    """Where top-2's time goes (E = --sweep-experts, index): the layer, its experts alone on a
    buffer of the dispatched shape, the layer with identity experts, and the dense ideal, all
    timed in alternation."""
    a = bench.args
    layer = make_layer(a, a.sweep_experts, "top2", "index", scale)
    shape = (a.sweep_experts, a.tokens // a.seq_len * layer.config.capacity(a.seq_len), a.d_model)
    x_END = jax.random.normal(jax.random.key(4), shape, jnp.float32).astype(a.dtype)
    graphdef, params = nnx.split(layer)

    def experts_only(p, x):
        return jnp.sum(nnx.merge(graphdef, p).experts(x).astype(jnp.float32))

    no_experts = make_layer(a, a.sweep_experts, "top2", "index", scale)
    no_experts.__class__ = _NoExperts
    cases = {"layer": layer_fwd_bwd(layer), "identity experts": layer_fwd_bwd(no_experts)}
    compiled = {k: (timing.compile_fn(fn, (p, bench.x))[0], (p, bench.x))
                for k, (fn, p) in cases.items()}  # fmt: skip
    fn = jax.grad(experts_only, argnums=(0, 1))
    compiled["experts alone"] = (timing.compile_fn(fn, (params, x_END))[0], (params, x_END))
    compiled["dense ideal"] = bench.dense(2 * a.d_ff)
    times, _ = timing.time_interleaved(list(compiled.values()), a.reps, a.slow_s)
    ms = {k: round(statistics.median(t), 1) for k, t in zip(compiled, times, strict=True)}
    out = {"experts": a.sweep_experts, "ms": ms, "load": timing.load_average()}
    out["x_dense"] = {k: round(v / ms["dense ideal"], 3) for k, v in ms.items()}
    log(f"  {out}")
    return out


def breakdown_table(b: dict) -> str:
    lines = [f"\n### top-2 time breakdown, E={b['experts']}, index (load {b['load']})\n",
             "| part | ms | x dense |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.1f} | {b['x_dense'][k]:.2f} |" for k, v in b["ms"].items()]
    return "\n".join(lines)


def calibrate_all(bench: Bench) -> dict[int, float]:
    a, scales = bench.args, {}
    for e in sorted(set(a.experts) | {a.sweep_experts}):
        w = make_layer(a, e, "topp", "index", 1.0).router_DE[...]
        scales[e] = calibrate_scale(w, bench.x, a.threshold, a.target_k)
        log(f"E={e}: router weights x{scales[e]:.3f} -> top-p mean k {a.target_k}")
    return scales


def run_sections(bench: Bench, scales: dict[int, float], out: dict) -> None:
    a, scale = bench.args, scales[bench.args.sweep_experts]
    sections = {
        "grid": (lambda: grid(bench, scales), "fwd+bwd per (E, router, dispatch)"),
        "sweep": (lambda: sweep(bench, scale, a.sweep_k), f"top-p sweep, E={a.sweep_experts}"),
        "matched": (lambda: matched(bench, scale), "top-p, expected_k = its measured mean k"),
        "budget": (lambda: budget_sweep(bench, scale), "grouped top-p, budget factor swept"),
        "blocks": (lambda: block_sweep(bench, scales), "grouped top-2, block size B"),
        "groups": (lambda: group_sweep(bench, scale), "grouped top-p, routing group size"),
    }  # fmt: skip
    for name, (run, title) in sections.items():
        out[name] = run() if name in a.sections else []
        if out[name]:
            print(table(title, out[name]), flush=True)
    out["priority"] = priority(bench, scale) if "priority" in a.sections else []
    if out["priority"]:
        print(priority_table(out["priority"]), flush=True)
    out["memory"] = memory(bench) if "memory" in a.sections and a.memory_groups else []
    if out["memory"]:
        print(memory_table(out["memory"]), flush=True)
    out["breakdown"] = breakdown(bench, scale) if "breakdown" in a.sections else {}
    if out["breakdown"]:
        print(breakdown_table(out["breakdown"]), flush=True)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    bench = Bench(a)
    head = f"matmul {a.matmul_size}^3 {a.dtype}: {bench.matmul:.1f} GFLOP/s"
    print(f"{head}; T={a.tokens} D={a.d_model} F={a.d_ff} cf={a.capacity_factor}", flush=True)
    scales = calibrate_all(bench)
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    out.update(matmul_gflops=round(bench.matmul, 1), router_scales=scales)
    out.update(jax=jax.__version__, device=str(jax.devices()[0]), load_start=timing.load_average())
    run_sections(bench, scales, out)
    out["load_end"] = timing.load_average()
    timing.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
