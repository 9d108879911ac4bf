"""One weight's product with few rows, in each form XLA's CPU backend might run, at Mixtral's
expert shape: which forms read the weight near the memory bandwidth.

Run from the repository root:

    .venv/bin/python -m experiments.bench_decode_forms [--rows 1 2 8] [--reps 30] [--json PATH]

For x [N, I] and one weight, every form computes x @ W (float32 accumulation), each compiled
ahead of time and all timed in alternation (``bench.harness.Bench``), with ``bench_decode``'s
bandwidth probe (an in-place copy of 256 MiB, read plus write counted) timed with them and
scaled to each weight's bytes. Weights, each a separate array (as in the decode layout):

* gate: [D, F] = [in, out] (the decode layout's gate and up), and the same weight stored
  [F, D] = [out, in];
* down: [D, F] = [out, in] (the decode layout's down projection);
* gate and up fused: [D, 2F], one product for both;
* gate and up [F, D] each, two products of the same rows: ``reduce`` (two plain
  multiply-reduces, which share one broadcast of x) and ``times_out_in`` (the decode path's
  form: each product behind an optimisation barrier; one float32 row keeps the
  matrix-vector product);
* gate [F, D] cut into two halves along F, two products (``times_out_in``): whether
  smaller products let the cores share one weight's read.

Forms: ``matmul`` (``dot_general`` on the stored layout, the contraction along the stored
``in`` axis), and ``reduce``: ``sum(W[out, in] * x[:, None, :], -1)``, a multiply-reduce over
the contiguous axis, which XLA hands to YNNPACK as one loop. In float32 and bfloat16 (x
rounded to bfloat16 for the matmul, as the layer's compute dtype does; the reduce sums in
float32). Reported per (dtype, rows, weight, form): median ms, GB/s of the weight's bytes, and
the ratio to the copy of those bytes.

Axis letters: N rows, D model width, F hidden width, I in, O out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dynmoe_jax.moe import experts
from experiments import report
from experiments.bench import flags, harness
from experiments.bench.decode_bytes import PROBE_MIB, copy_program

D, F = 1024, 3584


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=flags.positive(int), nargs="+", default=[1, 2, 8])
    p.add_argument("--dtypes", choices=["float32", "bfloat16"], nargs="+",
                   default=["float32", "bfloat16"])  # fmt: skip
    p.add_argument("--reps", type=flags.positive(int), default=30)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def matmul_io(x_NI, w_IO):
    return jax.lax.dot_general(x_NI.astype(w_IO.dtype), w_IO, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)  # fmt: skip


def matmul_oi(x_NI, w_OI):
    return jax.lax.dot_general(x_NI.astype(w_OI.dtype), w_OI, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)  # fmt: skip


def reduce_oi(x_NI, w_OI):
    return jnp.sum(w_OI.astype(jnp.float32)[None] * x_NI[:, None, :], axis=-1)


def reduce_pair(x_NI, ws_OI):
    return [reduce_oi(x_NI, w_OI) for w_OI in ws_OI]


def barrier_pair(x_NI, ws_OI):
    return [experts.times_out_in(x_NI.astype(w_OI.dtype), w_OI) for w_OI in ws_OI]


def weights(dtype: str) -> dict[str, tuple[Any, list[tuple[str, Callable]]]]:
    """name -> (array or arrays, [(form, fn)]) of the weights the module docstring lists."""
    k_gate, k_up, k_down = jax.random.split(jax.random.key(0), 3)
    gate_DF = (jax.random.normal(k_gate, (D, F)) * 0.03).astype(dtype)
    up_DF = (jax.random.normal(k_up, (D, F)) * 0.03).astype(dtype)
    down_DF = (jax.random.normal(k_down, (D, F)) * 0.03).astype(dtype)
    return {
        "gate [D, F]": (gate_DF, [("matmul", matmul_io)]),
        "gate [F, D]": (gate_DF.T.copy(), [("matmul", matmul_oi), ("reduce", reduce_oi)]),
        "down [D, F]": (down_DF, [("matmul", matmul_oi), ("reduce", reduce_oi)]),
        "gate+up [D, 2F]": (jnp.concatenate([gate_DF, up_DF], 1), [("matmul", matmul_io)]),
        "gate, up [F, D]": ((gate_DF.T.copy(), up_DF.T.copy()),
                            [("reduce", reduce_pair), ("times_out_in", barrier_pair)]),
        "gate [F, D] in halves": ((gate_DF[:, : F // 2].T.copy(), gate_DF[:, F // 2 :].T.copy()),
                                  [("times_out_in", barrier_pair)]),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = harness.Bench(args.reps)
    programs, meta = {}, {}
    for dtype in args.dtypes:
        for name, (w, forms) in weights(dtype).items():
            first = w[0] if isinstance(w, tuple) else w
            width = first.shape[0] if forms[0][1] is matmul_io else first.shape[1]
            nbytes = sum(a.nbytes for a in w) if isinstance(w, tuple) else w.nbytes
            for rows in args.rows:
                x_NI = jax.random.normal(jax.random.key(rows), (rows, width))
                for form, fn in forms:
                    key = f"{dtype} N={rows} {name} {form}"
                    programs[key] = bench.compile(fn, (x_NI, w))
                    meta[key] = (dtype, rows, name, form, nbytes)
    programs["copy"], copied = copy_program(PROBE_MIB)
    timings = bench.time(programs)
    ms = timings.medians
    copy_bytes_per_ms = copied / ms["copy"]
    rows = []
    for key, (dtype, n, name, form, nbytes) in meta.items():
        rows.append({"dtype": dtype, "rows": n, "weight": name, "form": form, "ms": ms[key],
                     "gb_per_s": nbytes / ms[key] / 1e6,
                     "x_copy": ms[key] / (nbytes / copy_bytes_per_ms)})  # fmt: skip
    header = ["dtype", "rows", "weight", "form", "ms", "GB/s", "x copy"]
    body = [[r["dtype"], r["rows"], r["weight"], r["form"], f"{r['ms']:.3f}",
             f"{r['gb_per_s']:.1f}", f"{r['x_copy']:.2f}"] for r in rows]  # fmt: skip
    print(f"load {timings.load} (1-minute average, at the end)")
    print(report.markdown_table(header, body))
    out = {"rows": rows, "load": timings.load, "median_of": args.reps}
    harness.write_json(args.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
