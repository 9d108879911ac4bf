"""The timed sections of ``bench_moe``: every case is the layer's forward+backward timed in
alternation with the dense SwiGLU of the width its tokens use, reported as one table row.

Sections: ``grid`` (E x router x dispatch), ``sweep`` (top-p's expected_k), ``matched``
(capacity sized to top-p's measured mean k), ``budget`` (grouped budget factor), ``blocks``
(grouped block size B), ``groups`` (routing group size).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

from dynmoe_jax import MoELayer
from experiments.bench.harness import log
from experiments.bench.layer_bench import LayerBench
from experiments.bench.layers import make_layer, mean_top_p_k
from experiments.flops import swiglu_fwd_bwd_flops


@dataclasses.dataclass(frozen=True)
class SectionRun:
    """What the sections of one invocation share: the cases' bench, the flags, the router
    scale per expert count, and the machine's matmul rate."""

    lb: LayerBench
    args: argparse.Namespace
    scales: dict[int, float]
    matmul_gflops: float

    @property
    def scale(self) -> float:
        """The router scale of --sweep-experts, the expert count of the sweeps."""
        return self.scales[self.args.sweep_experts]

    def layer(self, experts: int, router: str, dispatch: str, **changes) -> MoELayer:
        """The layer at the bench's shape, its router calibrated for ``experts``."""
        scale = self.scales.get(experts, 1.0)
        return make_layer(self.lb.shape, experts, router, dispatch, scale, **changes)

    def measured_k(self, experts: int) -> float:
        """Top-p's mean experts per token with the calibrated router, on the shared input."""
        router_DE = self.layer(experts, "topp", "grouped").router_DE[...]
        return mean_top_p_k(router_DE, self.lb.x, self.lb.shape.threshold)


def timed(run: SectionRun, layer: MoELayer, label: dict) -> dict:
    """One case's row: routing statistics, times, rates against the dense ideal and the
    matmul rate, XLA temp memory and compile time (or why it was skipped)."""
    a, lb = run.args, run.lb
    program = lb.layer(layer)
    row = {**label, "compile_s": round(program.compile_s, 2)}
    row["temp_mib"] = round(program.temp_bytes / 2**20, 1)
    if row["temp_mib"] > a.max_temp_gib * 1024:
        row["skipped"] = f"temp {row['temp_mib'] / 1024:.1f} GiB > --max-temp-gib"
        log(f"  {label}: skipped ({row['skipped']})")
        return row
    hidden = max(1, round(lb.useful_k(layer) * a.d_ff))
    programs = {"layer": program, "dense": lb.dense(hidden)}
    if a.fused_dense:
        programs["fused dense"] = lb.dense(hidden, fused=True)
    timings = lb.bench.time(programs)
    _, stats = timings.first_out
    row.update({k: round(float(v), 4) for k, v in jax.device_get(stats).items()})
    ms, dense_ms = timings.median("layer"), timings.median("dense")
    flops = swiglu_fwd_bwd_flops(a.tokens, a.d_model, row["experts_per_token"] * a.d_ff)
    gflops = flops / (ms * 1e-3) / 1e9
    all_ms = timings.all_ms["layer"]
    row.update(ms=round(ms, 1), reps=len(all_ms), all_ms=[round(t, 1) for t in all_ms])
    row.update(gflops=round(gflops, 1), dense_hidden=hidden, dense_ms=round(dense_ms, 1))
    row["x_dense"] = round(ms / dense_ms, 3)
    if a.fused_dense:
        row["x_dense_fused"] = round(ms / timings.median("fused dense"), 3)
    row["of_matmul_rate"] = round(gflops / run.matmul_gflops, 3)
    row["load"] = timings.load
    log(f"  {row}")
    return row


def grid(run: SectionRun) -> list[dict]:
    """Every (E, router, dispatch) of the flags; top-p's capacity for --grid-expected-k."""
    a, rows = run.args, []
    for e in a.experts:
        for router in a.routers:
            changes = {"expected_k": a.grid_expected_k} if router == "topp" else {}
            for dispatch in a.dispatch:
                layer = run.layer(e, router, dispatch, **changes)
                label = {"experts": e, "router": router, "dispatch": dispatch}
                rows.append(timed(run, layer, {**label, "expected_k": layer.config.capacity_k}))
    return rows


def sweep(run: SectionRun) -> list[dict]:
    """Top-p's expected_k (its capacity) swept: drops and time."""
    a, e, rows = run.args, run.args.sweep_experts, []
    for ek in a.sweep_k:
        layer = run.layer(e, "topp", a.sweep_dispatch, expected_k=ek)
        label = {"experts": e, "router": "topp", "dispatch": a.sweep_dispatch, "expected_k": ek}
        rows.append(timed(run, layer, label))
    return rows


def matched(run: SectionRun) -> list[dict]:
    """Top-p with capacity sized to its own measured mean k, every dispatch of the flags."""
    a, e, rows = run.args, run.args.sweep_experts, []
    k = round(run.measured_k(e), 3)
    for dispatch in a.dispatch:
        # grouped: one budget per group of --budget-factor x the mean; capacity modes: cf as set.
        changes = {"capacity_factor": a.budget_factor} if dispatch == "grouped" else {}
        layer = run.layer(e, "topp", dispatch, expected_k=k, **changes)
        label = {"experts": e, "router": "topp", "dispatch": dispatch}
        rows.append(timed(run, layer, {**label, "expected_k": k, **changes}))
    return rows


def budget(run: SectionRun) -> list[dict]:
    """Grouped top-p: the budget factor (on the measured mean k) swept; drops and time."""
    a, e, rows = run.args, run.args.sweep_experts, []
    k = round(run.measured_k(e), 3)
    for factor in a.budget_factors:
        layer = run.layer(e, "topp", "grouped", expected_k=k, capacity_factor=factor)
        label = {"experts": e, "router": "topp", "dispatch": "grouped", "expected_k": k}
        rows.append(timed(run, layer, {**label, "capacity_factor": factor}))
    return rows


def blocks(run: SectionRun) -> list[dict]:
    """Grouped top-2: the block size B of the grouped matmul, at --sweep-experts and the
    largest E."""
    a, rows = run.args, []
    for e in sorted({a.sweep_experts, max(a.experts)}):
        for b in a.block_sizes:
            layer = run.layer(e, "top2", "grouped", block_size=b)
            label = {"experts": e, "router": "top2", "dispatch": "grouped", "expected_k": 2.0}
            rows.append(timed(run, layer, {**label, "block_size": b}))
    return rows


def groups(run: SectionRun) -> list[dict]:
    """Grouped top-p at --budget-factor on the mean k: the routing group size (the budget is
    per group, so bigger groups even out the number of selections)."""
    a, e, rows = run.args, run.args.sweep_experts, []
    k = round(run.measured_k(e), 3)
    for g in a.group_sizes:
        changes = {"expected_k": k, "capacity_factor": a.budget_factor, "group_size": g}
        layer = run.layer(e, "topp", "grouped", **changes)
        label = {"experts": e, "router": "topp", "dispatch": "grouped"}
        rows.append(timed(run, layer, {**label, **changes}))
    return rows


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
