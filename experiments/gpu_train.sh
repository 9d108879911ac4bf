#!/usr/bin/env bash
# Trains a paper-shaped model (configs/paper.py: width 1024, 16 heads, 16 SwiGLU experts of
# width 2816, context 2048, top-p) with fewer layers, so that it fits one GPU, in bfloat16 for
# a few hundred steps on the pydoc corpus (shipped with CPython, so no download), then prints
# tokens/s and model FLOP utilisation: tokens/s x flops_per_step / tokens_per_step over the
# card's peak, with flops_per_step from the plan of the same config (dynmoe_jax/plan.py). The
# paper shape scans its layers, so the plan takes the analytic count (PaLM's 6 N_active +
# attention; XLA's cost analysis counts a loop body once); `mfu_analytic` always uses it. With
# no loop in the step the plan takes XLA's count, which includes remat's recomputation and
# capacity padding.
#
# Needs an NVIDIA GPU and a venv with jax[cuda12] (pip install "jax[cuda12]==0.10.2" plus this
# package; tokamax, the grouped matmul's kernels, is installed where missing). Run from the
# repository root:
#     bash experiments/gpu_train.sh [OUT_JSON]      (default experiments/results/gpu_train.json)
# Environment: PYTHON (default .venv/bin/python), LAYERS (8), BATCH (8 sequences), STEPS (300),
# VOCAB (32000; a small corpus's SentencePiece model may get fewer pieces, and the plan uses the
# count the tokenizer really has), PEAK_TFLOPS (989, see below), WORKDIR (the run's folder, kept;
# by default a temporary one, removed when the script exits, whatever the outcome).
# DRY_RUN=1 skips the GPU checks and runs the same pipeline on CPU at a tiny size (checks the
# script's logic where no GPU is present; its numbers mean nothing).
#
# PEAK_TFLOPS: NVIDIA's H200 datasheet gives 1,979 TFLOPS of BF16 Tensor Core throughput "with
# sparsity"; the dense peak, used here, is half of that, 989 TFLOPS (SXM). Set PEAK_TFLOPS for
# another card.
set -euo pipefail

PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-experiments/results/gpu_train.json}"
if [[ -z "${WORKDIR:-}" ]]; then
  WORKDIR="$(mktemp -d)"
  trap 'rm -rf -- "$WORKDIR"' EXIT
fi

fail() { echo "gpu_train.sh: $*" >&2; exit 2; }
source "$(dirname "$0")/gpu_check.sh"

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "gpu_train.sh: DRY_RUN=1: tiny sizes on CPU, no GPU checks" >&2
  export JAX_PLATFORMS=cpu
  SIZES=(layers=2 d_model=64 heads=4 experts=4 d_ff=128 seq_len=64 batch=4 steps=6 vocab=512
         memory=8e9 peak_tflops=1)
else
  require_gpu
  ensure_tokamax
  MEMORY=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  SIZES=(layers="${LAYERS:-8}" d_model=1024 heads=16 experts=16 d_ff=2816 seq_len=2048
         batch="${BATCH:-8}" steps="${STEPS:-300}" vocab="${VOCAB:-32000}"
         memory="$((MEMORY * 1024 * 1024))" peak_tflops="${PEAK_TFLOPS:-989}")
fi

echo "gpu_train.sh: workdir $WORKDIR" >&2
"$PY" - "$OUT" "$WORKDIR" "${SIZES[@]}" <<'EOF'
import json
import sys
from pathlib import Path

import jax

from dynmoe_jax import config as config_lib
from dynmoe_jax import data as data_lib
from dynmoe_jax import plan as plan_lib
from dynmoe_jax import train
from dynmoe_jax.configs import paper

out, workdir = sys.argv[1], Path(sys.argv[2])
size = {k: float(v) for k, v in (a.split("=") for a in sys.argv[3:])}
c = paper.get_config()
c.dataset, c.mesh_shape, c.grad_accum_steps = "pydoc", "", 1
c.vocab_size, c.seq_len, c.batch_size = int(size["vocab"]), int(size["seq_len"]), int(size["batch"])
c.num_train_steps = int(size["steps"])
c.warmup_steps = c.num_train_steps // 10
c.log_every_steps = max(c.num_train_steps // 10, 1)
c.eval_every_steps = c.checkpoint_every_steps = c.num_train_steps
c.eval_batches = 2
m = c.model
m.num_layers, m.d_model, m.num_heads = int(size["layers"]), int(size["d_model"]), int(size["heads"])
m.d_ff = c.moe.d_ff = int(size["d_ff"])
c.moe.num_experts = int(size["experts"])
c.moe.group_size = c.seq_len
c.lock()

# Trains (or reads) the tokenizer: its real vocabulary size.
data = data_lib.from_config(config_lib.resolve(c).data)
print(data.summary(), file=sys.stderr)
planned = c.copy_and_resolve_references()
planned.vocab_size = data.vocab_size
run = config_lib.resolve(planned)
plan = plan_lib.plan(run, size["memory"],
                     log=lambda line: print(line, file=sys.stderr))
print(f"plan: {json.dumps(plan)}", file=sys.stderr)

train.train_with_data(run, workdir, data, c.dataset)
records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
rates = [r["tokens_per_sec"] for r in records if r.get("split") == "train"]
steady = rates[1:] or rates  # the first window includes compilation
tokens_per_sec = sum(steady) / len(steady)
tokens_per_step = c.batch_size * c.seq_len
achieved = tokens_per_sec / tokens_per_step * plan["flops_per_step"]
peak = size["peak_tflops"] * 1e12
model_cfg = run.model  # its vocabulary: the tokenizer's
embed = 0 if model_cfg.tie_embeddings else data.vocab_size * model_cfg.d_model
analytic = plan_lib.analytic_flops(
    model_cfg, plan["active_params"] - embed, tokens_per_step, c.seq_len
)
analytic_rate = tokens_per_sec / tokens_per_step * analytic
result = {
    "device": str(jax.devices()[0].device_kind),
    "layers": m.num_layers,
    "vocab_size": data.vocab_size,
    "tokens_per_step": tokens_per_step,
    "steps": c.num_train_steps,
    "tokens_per_sec": tokens_per_sec,
    "achieved_tflops": achieved / 1e12,
    "peak_tflops": size["peak_tflops"],
    "mfu": achieved / peak,
    "analytic_flops_per_step": analytic,
    "mfu_analytic": analytic_rate / peak,
    "plan": plan,
}
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(f"{result['device']}: {tokens_per_sec:,.0f} tokens/s, {achieved / 1e12:.1f} TFLOP/s "
      f"({plan['flops_source']}), MFU {achieved / peak:.1%} of {size['peak_tflops']:g} TFLOP/s "
      f"({analytic_rate / peak:.1%} counting 6 N_active + attention)")
EOF
