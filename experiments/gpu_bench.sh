#!/usr/bin/env bash
# The MoE layer on an NVIDIA GPU: bench_moe.py in bfloat16 at larger sizes (every dispatch,
# grouped included: its grouped matmuls run on the platform's default backend, tokamax), then
# model FLOP utilisation (useful expert FLOPs per second / this card's measured bf16 matmul
# rate), then the grouped matmul alone on each backend (tokamax and jax.lax.ragged_dot), and
# whether rows past sum(group_sizes) cost anything.
#
# Needs an NVIDIA GPU and a venv with jax[cuda12] (pip install "jax[cuda12]==0.10.2" plus this
# package; tokamax, the grouped matmul's kernels, is installed where missing). Run from the
# repository root:
#     bash experiments/gpu_bench.sh [OUT_JSON]          (default experiments/results/gpu_bench.json)
# Environment: PYTHON (default .venv/bin/python), TOKENS (65536), D_MODEL (2048), D_FF (4096),
# EXPERTS ("16 64"), SEQ_LEN (2048: one routing group per sequence), MATMUL_SIZE (8192),
# MAX_TEMP_GIB (60), REPS (10).
# DRY_RUN=1 skips the GPU checks and runs the same pipeline on CPU at a tiny size (checks the
# script's logic where no GPU is present; its numbers mean nothing).
set -euo pipefail

PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-experiments/results/gpu_bench.json}"

fail() { echo "gpu_bench.sh: $*" >&2; exit 2; }
source "$(dirname "$0")/gpu_check.sh"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "gpu_bench.sh: DRY_RUN=1: tiny sizes on CPU, no GPU checks" >&2
  SIZES=(--tokens 512 --seq-len 128 --d-model 64 --d-ff 128 --experts 4 8 --matmul-size 256
         --sweep-experts 8 --reps 2 --max-temp-gib 1)
  export JAX_PLATFORMS=cpu
else
  require_gpu
  ensure_tokamax
  read -r -a EXPERT_LIST <<< "${EXPERTS:-16 64}"
  SIZES=(--tokens "${TOKENS:-65536}" --seq-len "${SEQ_LEN:-2048}" --d-model "${D_MODEL:-2048}"
         --d-ff "${D_FF:-4096}" --experts "${EXPERT_LIST[@]}" --matmul-size "${MATMUL_SIZE:-8192}"
         --sweep-experts 16 --reps "${REPS:-10}" --max-temp-gib "${MAX_TEMP_GIB:-60}")
fi

"$PY" -m experiments.bench_moe --dtype bfloat16 "${SIZES[@]}" --json "$OUT" \
  --sections grid matched budget memory --budget-factors 1.0 1.1 1.25

# Model FLOP utilisation: bench_moe's `of_matmul_rate` is exactly the achieved useful rate over
# the measured bf16 matmul rate; restate it per row with the card's rate.
"$PY" - "$OUT" <<'EOF'
import json
import sys

out = json.load(open(sys.argv[1]))
rate = out["matmul_gflops"]
print(f"\nMFU against this device's measured bf16 {out['args']['matmul_size']}^3 matmul: "
      f"{rate:.0f} GFLOP/s ({out['device']})")
print("| section | E | router | dispatch | cap k | k mean | ms | useful TFLOP/s | MFU |")
print("|---|---|---|---|---|---|---|---|---|")
for section in ("grid", "sweep", "matched", "budget"):
    for r in out[section]:
        if "skipped" in r:
            print(f"| {section} | {r['experts']} | {r['router']} | {r['dispatch']} | "
                  f"{r['expected_k']:.2f} | - | skipped: {r['skipped']} | | |")
            continue
        print(f"| {section} | {r['experts']} | {r['router']} | {r['dispatch']} | "
              f"{r['expected_k']:.2f} | {r['experts_per_token']:.2f} | {r['ms']:.1f} | "
              f"{r['gflops'] / 1e3:.1f} | {r['of_matmul_rate']:.1%} |")
EOF

# The grouped matmul alone, forward+backward, on each backend: with every row in a group, then
# with half the rows past sum(group_sizes) (a kernel that skips unused rows takes about half the
# time).
"$PY" - "${SIZES[@]}" <<'EOF'
import sys
import time

import jax
import jax.numpy as jnp

from dynmoe_jax.moe.config import Backend
from dynmoe_jax.moe.kernels.grouped_matmul import grouped_matmul, tokamax_available

args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
rows, d, f, e = int(args["--tokens"]) * 2, int(args["--d-model"]), int(args["--d-ff"]), 16
x = jax.random.normal(jax.random.key(0), (rows, d), jnp.bfloat16)
w = jax.random.normal(jax.random.key(1), (e, d, f), jnp.bfloat16)


def timed(backend: Backend, used_rows: int) -> float:
    sizes = jnp.full((e,), used_rows // e // 128 * 128, jnp.int32)

    def loss(x, w):
        return jnp.sum(grouped_matmul(x, w, sizes, backend=backend).astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    jax.block_until_ready(fn(x, w))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(fn(x, w))
    return (time.perf_counter() - t0) / 5 * 1e3


flops = 3 * 2 * rows * d * f  # forward, dX and dW, every row in use
backends = [Backend.TOKAMAX] * tokamax_available() + [Backend.RAGGED_DOT]
print(f"\ngrouped_matmul fwd+bwd, {rows} rows x [{d}, {f}], E={e}, bfloat16:")
for backend in backends:
    full, half = timed(backend, rows), timed(backend, rows // 2)
    print(f"  {backend.value}: all rows used {full:.2f} ms ({flops / full / 1e9:.1f} TFLOP/s), "
          f"half used {half:.2f} ms (ratio {half / full:.2f}; ~0.5 = unused rows cost nothing)")
EOF
