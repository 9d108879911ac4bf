"""The CPU decode kernel alone, against the memory bandwidth of reading its weights.

Run from the repository root:

    .venv/bin/python -m experiments.bench_decode_kernel [--d-model 1024] [--d-ff 3584]
        [--experts 8] [--tokens 1 2 3 4 8] [--dtype float32 bfloat16] [--reps 10]
        [--json PATH]

One program per (dtype, n): every one of ``--experts`` experts' SwiGLU
(``kernels.cpu_swiglu.expert_swiglu``, weights in the decode layout [out, in]) with n tokens
selecting it out of a call of max(--tokens) tokens, each expert's output kept apart (as the
decode path weights each apart). All experts' weights together are far larger than the
caches, so each call reads every weight from memory, as a decode step does. Timed with them,
in alternation (``bench.harness.Bench``, median of ``--reps``): the copy and read probes of
``bench_decode`` (``bench.decode_bytes``, 256 MiB). Reported per row: ms per call, the weight
bytes read per second, and that rate over the read and over the copy bandwidth. The rate a
decode step reaches over the read bandwidth cannot exceed 1 (every weight read once); the
rows show how close the kernel's products come at each number of tokens per expert, which is
what a batch of B rows gives each expert (about B k / E of them).

Axis letters: D model width, F expert hidden width, E experts, M tokens of a call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax.moe.kernels import cpu_swiglu
from experiments import report
from experiments.bench import flags, harness
from experiments.bench.decode_bytes import PROBE_MIB, copy_program, read_program

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=flags.positive(int), default=1024)
    p.add_argument("--d-ff", type=flags.positive(int), default=3584)
    p.add_argument("--experts", type=flags.positive(int), default=8)
    p.add_argument("--tokens", type=flags.positive(int), nargs="+", default=[1, 2, 3, 4, 8],
                   help="tokens selecting each expert, one row per value")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--reps", type=flags.positive(int), default=10)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def expert_weights(d: int, f: int, experts: int, dtype) -> list[tuple[jax.Array, ...]]:
    """Per expert: gate and up [F, D] and down [D, F], random, scaled as a layer's."""
    key = jax.random.key(0)
    out = []
    for e in range(experts):
        k_gate, k_up, k_down = jax.random.split(jax.random.fold_in(key, e), 3)
        out.append((
            (jax.random.normal(k_gate, (f, d)) / np.sqrt(d)).astype(dtype),
            (jax.random.normal(k_up, (f, d)) / np.sqrt(d)).astype(dtype),
            (jax.random.normal(k_down, (d, f)) / np.sqrt(f)).astype(dtype),
        ))  # fmt: skip
    return out


def all_experts(x_MD: jax.Array, take_M: jax.Array, weights) -> list[jax.Array]:
    return [cpu_swiglu.expert_swiglu(x_MD, take_M, *w) for w in weights]


def run(args: argparse.Namespace) -> dict:
    if not cpu_swiglu.available():
        raise SystemExit("error: the CPU decode kernel is not available (see the warning)")
    m = max(args.tokens)
    x_MD = jax.random.normal(jax.random.key(1), (m, args.d_model), jnp.float32)
    bench = harness.Bench(args.reps)
    programs, weight_bytes = {}, {}
    for name in args.dtype:
        weights = expert_weights(args.d_model, args.d_ff, args.experts, DTYPES[name])
        weight_bytes[name] = sum(w.nbytes for ws in weights for w in ws)
        for n in args.tokens:
            take_M = jnp.arange(m) < n
            programs[(name, n)] = bench.compile(all_experts, (x_MD, take_M, weights))
    (copy_call, copied), (read_call, read) = copy_program(PROBE_MIB), read_program(PROBE_MIB)
    timings = bench.time({**{f"{k[0]} {k[1]}": p for k, p in programs.items()},
                          "copy": copy_call, "read": read_call})  # fmt: skip
    ms = timings.medians
    copy_bw, read_bw = copied / (ms["copy"] / 1e3), read / (ms["read"] / 1e3)
    rows = []
    for name, n in programs:
        rate = weight_bytes[name] / (ms[f"{name} {n}"] / 1e3)
        rows.append({"dtype": name, "tokens_per_expert": n, "ms": ms[f"{name} {n}"],
                     "weights_gib_per_s": rate / 2**30, "of_read": rate / read_bw,
                     "of_copy": rate / copy_bw})  # fmt: skip
    return {"d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
            "weights_mib": {k: v / 2**20 for k, v in weight_bytes.items()},
            "copy_gib_per_s": copy_bw / 2**30, "read_gib_per_s": read_bw / 2**30,
            "rows": rows, "all_ms": timings.all_ms, "load": timings.load}  # fmt: skip


def table(out: dict) -> str:
    header = ["dtype", "tokens / expert", "ms / call", "weights GiB/s", "of read bandwidth",
              "of copy bandwidth"]  # fmt: skip
    body = [[r["dtype"], r["tokens_per_expert"], f"{r['ms']:.2f}",
             f"{r['weights_gib_per_s']:.1f}", f"{r['of_read']:.2f}", f"{r['of_copy']:.2f}"]
            for r in out["rows"]]  # fmt: skip
    return report.markdown_table(header, body)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load_before = harness.load_average()
    out = run(args) | {"load_before": load_before}
    print(f"D={args.d_model} F={args.d_ff} experts={args.experts} "
          f"read {out['read_gib_per_s']:.1f} GiB/s, copy {out['copy_gib_per_s']:.1f} GiB/s, "
          f"load {load_before} before, {out['load']} after")  # fmt: skip
    print(table(out))
    harness.write_json(args.json, report.jsonable(out))
    return out


if __name__ == "__main__":
    main()
