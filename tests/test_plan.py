"""Plan mode: counts against a real model and a hand count, bytes per device against the
sharding, the analytic FLOPs by hand, and the one-line errors."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from dynmoe_jax import plan as plan_lib
from dynmoe_jax.config import resolve
from dynmoe_jax.configs import tiny
from dynmoe_jax.model.decoder import Decoder
from dynmoe_jax.validation import ConfigError

# The tiny config by hand: V=512, D=32, 2 layers, 4 experts of width 32, top-p (expected_k 2).
V, D, L, E, F = 512, 32, 2, 4, 32
EMBED = HEAD = V * D
ATTENTION = 4 * D * D  # wq, wk, wv, wo (2 heads of width 16, no grouping)
NORMS = 2 * D
ROUTER = D * E
EXPERTS = 3 * E * D * F  # gate, up, down per expert
TINY = "dynmoe_jax/configs/tiny.py"
NON_EXPERT = EMBED + HEAD + L * (ATTENTION + NORMS + ROUTER) + D  # + final norm
TOTAL = NON_EXPERT + L * EXPERTS


def _tiny_model():
    return dataclasses.replace(resolve(tiny.get_config()).model, vocab_size=V)


@pytest.fixture(scope="module")
def one_device():
    return plan_lib.plan(resolve(tiny.get_config()), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def eight_devices():
    c = tiny.get_config()
    c.mesh_shape = "data=2,expert=4"
    c.batch_size, c.grad_accum_steps = 16, 2  # a loop in the step: cost analysis counts it once
    return plan_lib.plan(resolve(c))


def test_param_counts_match_the_model_and_a_hand_count(one_device):
    model = Decoder(
        dataclasses.replace(resolve(tiny.get_config()).model, vocab_size=V), rngs=nnx.Rngs(0)
    )
    real = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert one_device["params"] == real == TOTAL == 65952
    assert one_device["active_params"] == NON_EXPERT + L * EXPERTS * 2.0 / E == 53664


def test_top_k_active_params_use_top_k():
    c = tiny.get_config()
    c.moe.router, c.moe.top_k = "top_k", 1
    cfg = dataclasses.replace(resolve(c).model, vocab_size=V)
    assert plan_lib.active_params(cfg, TOTAL, L * EXPERTS) == NON_EXPERT + L * EXPERTS / E


def test_ffn_params_per_token_count_dense_layers_experts_and_the_shared_expert():
    c = tiny.get_config()
    c.model.num_layers, c.model.moe_every, c.model.d_ff = 4, 2, 48  # layers 1 and 3 are MoE
    cfg = resolve(c).model
    dense_layer, expert = 3 * D * 48, 3 * D * F
    assert plan_lib.ffn_params_per_token(cfg, 1.5) == 2 * dense_layer + 2 * 1.5 * expert
    assert plan_lib.ffn_params_per_token(cfg) == 2 * dense_layer + 2 * 2.0 * expert  # expected_k
    with_shared = dataclasses.replace(cfg, shared_d_ff=16)
    shared = 3 * D * 16
    assert plan_lib.ffn_params_per_token(with_shared, 1.0) == 2 * (dense_layer + expert + shared)


def test_ffn_params_per_token_count_each_layer_at_its_own_k():
    c = tiny.get_config()
    c.moe.router, c.moe.top_k = "top_k", (1, 3)
    cfg = resolve(c).model
    assert plan_lib.ffn_params_per_token(cfg) == (1 + 3) * 3 * D * F
    assert plan_lib.active_params(cfg, TOTAL, L * EXPERTS) == NON_EXPERT + L * EXPERTS * 2 / E


def test_one_device_holds_everything(one_device):
    assert one_device["params_bytes_per_device"] == 4 * TOTAL
    # Adam's two moments per parameter, plus two int32 step counters (Adam's, the schedule's).
    assert one_device["opt_state_bytes_per_device"] == 2 * 4 * TOTAL + 8
    assert one_device["temp_bytes_per_device"] > 0
    assert one_device["compile_s"] > 0
    assert set(one_device) == {
        "params", "active_params", "params_bytes_per_device", "opt_state_bytes_per_device",
        "temp_bytes_per_device", "flops_per_step", "flops_source", "compile_s",
    }  # fmt: skip


def test_experts_split_over_the_expert_axis(eight_devices):
    per_device = NON_EXPERT + L * EXPERTS // 4  # expert=4; everything else replicated
    assert eight_devices["params"] == TOTAL
    assert eight_devices["params_bytes_per_device"] == 4 * per_device
    assert eight_devices["opt_state_bytes_per_device"] == 2 * 4 * per_device + 8


def test_analytic_flops_by_hand():
    cfg = _tiny_model()
    matmul = 53664 - EMBED  # active, less the input lookup
    per_token = 6 * matmul + 12 * L * 2 * 16 * 32  # 2 heads of width 16, window 32
    assert plan_lib.analytic_flops(cfg, matmul, 256, 32) == per_token * 256


def test_flops_are_the_compiled_count_unless_a_loop_hides_work(one_device, eight_devices):
    analytic = plan_lib.analytic_flops(
        dataclasses.replace(resolve(tiny.get_config()).model, vocab_size=V), 53664 - EMBED, 256, 32
    )
    assert one_device["flops_source"] == "cost_analysis"
    # Capacity padding and the non-matmul work add to the matmuls, never subtract.
    assert analytic <= one_device["flops_per_step"] < 2 * analytic
    # grad_accum_steps=2 runs the step's body in a scan, which cost analysis counts once.
    assert eight_devices["flops_source"].startswith("analytic")
    assert eight_devices["flops_per_step"] == pytest.approx(2 * analytic)


def _cli(*args):
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "dynmoe_jax.main", *args], cwd=root,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_a_plan_that_does_not_fit_fails_in_one_line():
    proc = _cli(f"--config={TINY}", "--mode=plan", "--device_memory_bytes=1e6")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(
        "error: device_memory_bytes=1000000.0 is invalid: allowed at least the plan's per-device "
        "total 0."
    )
    assert "(params 0.00 + optimizer 0.00 + temporaries 0.0" in lines[0]


def test_a_mesh_that_does_not_divide_fails_before_compiling():
    c = tiny.get_config()
    c.mesh_shape = "data=-1,expert=3"
    with pytest.raises(ConfigError, match=r"^mesh_shape='data=-1,expert=3' is invalid"):
        plan_lib.plan(resolve(c))
    c.mesh_shape, c.moe.num_experts = "expert=8", 4
    with pytest.raises(ConfigError, match=r"^moe.num_experts=4 is invalid: allowed a multiple"):
        plan_lib.plan(resolve(c))


def test_plan_mode_prints_progress_then_the_json_last():
    proc = _cli(f"--config={TINY}", "--mode=plan")  # no workdir: plan writes nothing
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("plan: ")
    result = json.loads(lines[-1])
    assert (result["params"], result["active_params"]) == (TOTAL, 53664)
    assert result["params_bytes_per_device"] == 4 * TOTAL


@pytest.mark.parametrize(
    "args, line",
    [
        (["--mode=train"], "error: --workdir=None is invalid: allowed a folder (--mode=train "
                           "needs one)"),
        (["--mode=plan", "--device_memory_bytes=0"],
         "error: --device_memory_bytes=0.0 is invalid: allowed a number of bytes > 0, e.g. 80e9"),
    ],
)  # fmt: skip
def test_plan_flags_fail_in_one_line(args, line):
    proc = _cli(f"--config={TINY}", *args)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", "")
