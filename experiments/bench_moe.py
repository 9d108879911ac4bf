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
sweep the budget factor, B, the routing group size and the drop order.

Router: the layer's own, with its weights scaled so that top-p selects ``--target-k`` experts on
average, as a trained router does (a fresh router's flat probabilities make top-p pick many
more). The scale is found by bisection per E and applied to every router of that E; the
measured mean k is reported. Extra sections: top-p's expected_k swept (drops and time), and
top-p with expected_k set to its measured mean k.

The sections live in ``experiments/bench/moe_sweeps.py`` (timed cases) and
``experiments/bench/moe_probes.py`` (priority, memory, breakdown); the timing harness in
``experiments/bench/``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench import flags, harness, moe_probes, moe_sweeps
from experiments.bench.dense import matmul_gflops
from experiments.bench.layer_bench import LayerBench
from experiments.bench.layers import DISPATCHES, ROUTERS
from experiments.bench.moe_sweeps import SectionRun


@dataclasses.dataclass(frozen=True)
class Section:
    """One section: its cases, its table, and the table's title (formatted with the flags)."""

    run: Callable[[SectionRun], Any]
    table: Callable[[str, Any], str]
    title: str
    empty: Callable[[], Any] = list  # its JSON value when it does not run


SECTIONS = {  # in the order they run, whatever the order of --sections
    "grid": Section(moe_sweeps.grid, moe_sweeps.table, "fwd+bwd per (E, router, dispatch)"),
    "sweep": Section(moe_sweeps.sweep, moe_sweeps.table, "top-p sweep, E={sweep_experts}"),
    "matched": Section(moe_sweeps.matched, moe_sweeps.table,
                       "top-p, expected_k = its measured mean k"),
    "budget": Section(moe_sweeps.budget, moe_sweeps.table, "grouped top-p, budget factor swept"),
    "blocks": Section(moe_sweeps.blocks, moe_sweeps.table, "grouped top-2, block size B"),
    "groups": Section(moe_sweeps.groups, moe_sweeps.table, "grouped top-p, routing group size"),
    "priority": Section(moe_probes.priority, moe_probes.priority_table,
                        "grouped top-p, drop order under a binding budget (forward)"),
    "memory": Section(moe_probes.memory, moe_probes.memory_table,
                      "temp memory, fwd+bwd (compile only)"),
    "breakdown": Section(moe_probes.breakdown, moe_probes.breakdown_table,
                         "top-2 time breakdown, E={sweep_experts}, index", dict),
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    positive_int, positive_float = flags.positive(int), flags.positive(float)
    p.add_argument("--experts", type=positive_int, nargs="+", default=[8, 16, 64])
    p.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    p.add_argument("--dispatch", nargs="+", choices=DISPATCHES, default=list(DISPATCHES))
    flags.add_layer_shape(p)
    p.add_argument("--target-k", type=positive_float, default=1.75,
                   help="top-p mean k to calibrate to")  # fmt: skip
    p.add_argument("--grid-expected-k", type=positive_float, default=2.0, help="top-p capacity k")
    p.add_argument("--reps", type=positive_int, default=3)
    p.add_argument("--slow-s", type=float, default=4.0, help="one timed call if warm-up > this")
    p.add_argument("--max-temp-gib", type=float, default=4.0, help="skip bigger programs")
    p.add_argument("--matmul-size", type=positive_int, default=2048)
    p.add_argument("--sweep-k", type=positive_float, nargs="*",
                   default=[1.5, 1.75, 2.0, 2.25, 2.5])  # fmt: skip
    p.add_argument("--sweep-experts", type=positive_int, default=16)
    p.add_argument("--sweep-dispatch", default="index", choices=DISPATCHES[:2])
    p.add_argument("--budget-factor", type=positive_float, default=1.1,
                   help="grouped: on measured k")  # fmt: skip
    p.add_argument("--budget-factors", type=positive_float, nargs="*",
                   default=[1.0, 1.05, 1.1, 1.2, 1.3])  # fmt: skip
    p.add_argument("--block-sizes", type=positive_int, nargs="*", default=[64, 128, 256])
    p.add_argument("--group-sizes", type=positive_int, nargs="*", default=[256, 1024, 8192])
    p.add_argument("--priority-factors", type=positive_float, nargs="*", default=[0.9, 1.0])
    p.add_argument("--fused-dense", action="store_true", help="also x a fused-gate/up dense")
    p.add_argument("--memory-experts", type=positive_int, default=64)
    p.add_argument("--memory-groups", type=positive_int, nargs="*", default=[1024, 4096, 8192])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    flags.check_layer_shape(p, args)
    return args


def run_sections(run: SectionRun, out: dict) -> None:
    """Runs the chosen sections in order, printing each one's table as it ends."""
    for name, section in SECTIONS.items():
        out[name] = section.run(run) if name in run.args.sections else section.empty()
        if out[name]:
            title = section.title.format(**vars(run.args))
            print(section.table(title, out[name]), flush=True)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    bench = harness.Bench(a.reps, a.slow_s)
    lb = LayerBench(flags.layer_shape(a), bench)
    rate = matmul_gflops(a.matmul_size, jnp.dtype(a.dtype))
    head = f"matmul {a.matmul_size}^3 {a.dtype}: {rate:.1f} GFLOP/s"
    print(f"{head}; T={a.tokens} D={a.d_model} F={a.d_ff} cf={a.capacity_factor}", flush=True)
    scales = lb.calibrate([*a.experts, a.sweep_experts], a.target_k)
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    out.update(matmul_gflops=round(rate, 1), router_scales=scales)
    out.update(jax=jax.__version__, device=str(jax.devices()[0]), load_start=harness.load_average())
    run_sections(SectionRun(lb, a, scales, rate), out)
    out["load_end"] = harness.load_average()
    harness.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
