# Sourced by gpu_bench.sh and gpu_train.sh. require_gpu stops with a message naming what is
# missing unless an NVIDIA driver sees a GPU and JAX in "$PY" runs on it, then prints the card;
# ensure_tokamax installs the grouped matmul's kernels.
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

# The grouped matmul's GPU kernels come from tokamax (pyproject's `gpu` extra). Installs the
# version tested with jax 0.10.2 where it is missing; where pip cannot reach a registry, says so
# and goes on: the layer then falls back to jax.lax.ragged_dot and warns.
TOKAMAX_PIN="tokamax==0.0.12"
ensure_tokamax() {
  "$PY" -c "import tokamax" 2>/dev/null && return 0
  echo "tokamax is missing: pip install $TOKAMAX_PIN" >&2
  "$PY" -m pip install -q "$TOKAMAX_PIN" >&2 \
    || echo "could not install $TOKAMAX_PIN: the grouped matmuls run as jax.lax.ragged_dot" >&2
}
