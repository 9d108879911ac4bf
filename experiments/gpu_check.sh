# Sourced by gpu_bench.sh and gpu_train.sh: stops with a message naming what is missing unless
# an NVIDIA driver sees a GPU and JAX in "$PY" runs on it, then prints the card.
require_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: no NVIDIA driver on this machine"
  nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi sees no GPU"
  "$PY" - <<'EOF' || fail "JAX sees no GPU: install jax[cuda12] in this venv (PYTHON=$PY)"
import sys
import jax
backend = jax.default_backend()
print(f"jax {jax.__version__}: backend {backend}, devices {jax.devices()}", file=sys.stderr)
sys.exit(0 if backend == "gpu" else 1)
EOF
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >&2
}
