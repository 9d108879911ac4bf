"""The CPU decode kernel (one expert's SwiGLU on the rows that selected it) against a float64
loop, its build and its refusals; the decode path and generation with it against XLA's forms."""

import dataclasses
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dynmoe_jax import generate
from dynmoe_jax.model.config import ModelConfig
from dynmoe_jax.moe import decode as decode_experts
from dynmoe_jax.moe import experts
from dynmoe_jax.moe import layer as layer_lib
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.moe.kernels import cpu_swiglu
from tests import reference
from tests.runs import perturbed_params

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_swiglu.available(),
    reason="the CPU kernel needs a CPU backend and a C++ compiler",
)


def _inputs(m, d, f, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32)
    shapes = ((f, d), (f, d), (d, f))
    weights = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), dtype) for s in shapes]
    return x, weights


def _reference(x, take, weights):
    """Per row, float64 (weights stored [out, in]): the SwiGLU where taken, else 0."""
    gate, up, down = (np.asarray(w.astype(jnp.float32), np.float64).T for w in weights)
    y = np.zeros(x.shape)
    for m in np.flatnonzero(take):
        y[m] = reference.swiglu(x[m].astype(np.float64), gate, up, down)
    return y


# Widths off the kernel's steps (16 float32, 32 bfloat16 columns) take its scalar tails; 1 to
# 9 rows take every tile of rows, one weight row or eight at a time.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("m", "d", "f"), [(1, 64, 96), (3, 33, 70), (9, 128, 200), (6, 5, 7)])
def test_kernel_equals_a_float64_loop(dtype, m, d, f):
    x, weights = _inputs(m, d, f, dtype)
    for take in (np.arange(m) % 3 != 1, np.ones(m, bool), np.zeros(m, bool)):
        got = jax.jit(cpu_swiglu.expert_swiglu)(jnp.asarray(x), jnp.asarray(take), *weights)
        want = _reference(x, take, weights)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        assert not np.any(np.asarray(got)[~take])  # rows not taken are exactly zero


def test_kernel_output_takes_the_dtype_of_x():
    x, weights = _inputs(4, 32, 48, jnp.bfloat16)
    take = jnp.array([True, False, True, True])
    got = cpu_swiglu.expert_swiglu(jnp.asarray(x, jnp.bfloat16), take, *weights)
    want = _reference(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), take, weights)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, t, w: (x[None], t, w), r"x_MD must be \[M, D\]"),
        (lambda x, t, w: (x, t[:2], w), r"take_M must be \[4\]"),
        (lambda x, t, w: (x, t, [w[0].T, w[1], w[2]]), r"w_gate must be \(48, 32\)"),
        (lambda x, t, w: (x, t, [w[0], w[1], w[2][:, :5]]), r"w_down must be \(32, 48\)"),
        (lambda x, t, w: (x, t, [w[0], w[1].astype(jnp.bfloat16), w[2]]), "all bfloat16"),
        (lambda x, t, w: (x, t, [v.astype(jnp.float16) for v in w]), "w_gate is float16"),
    ],
)
def test_kernel_refuses_mismatched_inputs_before_compiling(change, message):
    x, weights = _inputs(4, 32, 48, jnp.float32)
    x, take, weights = change(jnp.asarray(x), jnp.ones(4, bool), weights)
    with pytest.raises(ValueError, match=message):
        cpu_swiglu.expert_swiglu(x, take, *weights)


def test_decode_path_with_the_kernel_equals_xla_forms():
    m, d, f, e = 5, 32, 48, 4
    rng = np.random.default_rng(3)
    x_MD = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    mask_ME = jnp.asarray(rng.random((m, e)) < 0.4).at[:, 2].set(False)  # expert 2 unused
    weights_ME = jnp.where(mask_ME, jnp.asarray(rng.random((m, e)), jnp.float32), 0)
    weights = tuple(
        tuple(jnp.asarray(rng.standard_normal(s) / 4, jnp.float32) for _ in range(e))
        for s in ((f, d), (f, d), (d, f))
    )
    for max_used in (e - 1, e):  # the loop, and the loop or the sum over every expert
        run = lambda kernel, mu=max_used: decode_experts.selected_experts(  # noqa: E731
            x_MD, mask_ME, weights_ME, weights, mu, kernel=kernel
        )
        (y_kernel, used), (y_xla, used_xla) = run(True), run(False)
        np.testing.assert_allclose(y_kernel, y_xla, rtol=1e-5, atol=1e-6)
        assert int(used) == int(used_xla) == 3


def _model():
    """A small random decoder (4 experts, top-2) and its parameters, every one perturbed."""
    moe = MoEConfig(num_experts=4, d_model=32, d_ff=40, capacity_factor=None)
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48, moe=moe)
    return cfg, perturbed_params(cfg)


def _generate(cfg, params, kernel, expert_dtype=None):
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, decode_kernel=kernel))
    _, layout = generate.decode_layout(cfg, params, expert_dtype=expert_dtype)
    graphdef = generate.decode_graphdef(cfg)
    prompts = [[5, 17, 3, 42, 8], [9, 1], [60, 2, 33, 33, 7, 12, 40, 1]]
    return generate.generate(graphdef, layout, prompts, 9, keep_logits=True), layout


def test_generation_with_the_kernel_equals_xla_forms():
    cfg, params = _model()
    (xla, _), (kernel, _) = _generate(cfg, params, False), _generate(cfg, params, True)
    assert kernel.tokens == xla.tokens
    for got, want in zip(kernel.logits, xla.logits, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_expert_weights_in_a_float32_model():
    """decode_layout(expert_dtype=bfloat16): the layout holds bfloat16 experts, everything else
    float32, and the kernel's logits are XLA's on the same values held in float32."""
    cfg, params = _model()
    params = nnx.to_pure_dict(params)
    rounded = jax.tree.map_with_path(
        lambda path, x: x.astype(jnp.bfloat16).astype(x.dtype)
        if path[-1].key in experts.NAMES else x, params
    )  # fmt: skip
    (half, layout), (xla, _) = (
        _generate(cfg, params, True, jnp.bfloat16),
        _generate(cfg, rounded, False),
    )
    dtypes = {p[-1]: v.get_value() for p, v in nnx.to_flat_state(layout) if p[-1] != "embed_VD"}
    assert all(w[0].dtype == jnp.bfloat16 for name, w in dtypes.items() if name in experts.NAMES)
    assert {w.dtype for name, w in dtypes.items() if name not in experts.NAMES} == {
        jnp.dtype(jnp.float32)
    }
    assert half.tokens == xla.tokens
    for got, want in zip(half.logits, xla.logits, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_build_is_cached_per_source_and_refuses_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNMOE_JAX_KERNEL_DIR", str(tmp_path))
    first = cpu_swiglu._build()
    assert first.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert cpu_swiglu._build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler"):
        cpu_swiglu._build()


def test_a_failed_build_names_the_first_error():
    err = subprocess.CalledProcessError(
        1, ["c++"], stderr="note: x\nkernel.cc:3:1: error: expected ';'\n  | ^\n"
    )
    assert cpu_swiglu._reason(err) == "the build failed: kernel.cc:3:1: error: expected ';'"


def test_without_a_compiler_the_kernel_is_unavailable_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNMOE_JAX_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.warns(RuntimeWarning, match=r"not available \(no C\+\+ compiler"):
        assert cpu_swiglu._load.__wrapped__() is None
    assert not list(tmp_path.iterdir())


def test_the_layer_takes_the_kernel_only_when_asked_and_built(monkeypatch):
    cfg = MoEConfig(num_experts=4, d_model=8, d_ff=12)
    split = tuple(tuple(jnp.zeros((2, 2)) for _ in range(4)) for _ in range(3))
    stacked = tuple(jnp.zeros((4, 2, 2)) for _ in range(3))
    assert layer_lib._takes_kernel(cfg, split)
    assert not layer_lib._takes_kernel(cfg, stacked)  # the training layout
    assert not layer_lib._takes_kernel(dataclasses.replace(cfg, decode_kernel=False), split)
    half = tuple(tuple(jnp.zeros((2, 2), jnp.float16) for _ in range(4)) for _ in range(3))
    assert not layer_lib._takes_kernel(cfg, half)
    monkeypatch.setattr(cpu_swiglu, "available", lambda: False)
    assert not layer_lib._takes_kernel(cfg, split)
